//! A running node: storage, membership, the QUIC endpoint and the request
//! router that ties them to the coordinator.
//!
//! [`Node::start`] opens the store, binds the endpoint, serves requests and
//! forms or joins the cluster; it returns a [`NodeHandle`] whose
//! [`shutdown`](NodeHandle::shutdown) drains the node (new requests are
//! refused, those under way may finish and their answers reach the
//! client), then stops what is left, closes connections and waits for
//! every loop to end. The router is thin:
//! client requests go to the [`Coordinator`], replica requests to the local
//! [`ReplicaService`], membership requests to [`Membership`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ringkv_coordinator::coordinator::{Coordinator, CoordinatorConfig};
use ringkv_coordinator::failure::{probe_round, DetectorConfig, FailureDetector};
use ringkv_coordinator::replica::ReplicaService;
use ringkv_core::regions::LatencyMatrix;
use ringkv_core::wire::{
    ErrorKind, Identity, JoinRequest, Member, NodeStats, NodeStatus, ReplicaRequest, Request,
    Response, StatusReply, FRAME_MAX_BYTES, VALUE_MAX_BYTES,
};
use ringkv_core::{NodeId, Transport};
use ringkv_repair::anti_entropy::{self, AntiEntropy, AntiEntropyConfig};
use ringkv_repair::handoff::{self, HandoffConfig, HintRouting};
use ringkv_repair::hints::{self, HintBook, HintConfig};
use ringkv_repair::merkle::DEFAULT_LEAF_BITS;
use ringkv_repair::read_repair::{self, ReadRepairQueue};
use ringkv_repair::tombstones;
use ringkv_repair::trees::ReplicaTrees;
use ringkv_ring::Ring;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster_key::ClusterKey;
use crate::error::NodeError;
use crate::membership::{ClusterRecord, Membership};
use crate::quic::{serve_connection, CallError, PeerPool};
use crate::region_links::RegionLinks;
use crate::request_memory::RequestMemory;
use crate::storage::{millis, unix_ms, Storage};
use crate::tls;

mod cleanup;
mod connection_sources;
mod handover_store;
mod leave;
mod recent_rings;
mod removed_senders;
mod ring_handover;
mod stored_pages;
mod tombstone_gc;

use stored_pages::StoredPages;

/// The default N for a new cluster.
pub const DEFAULT_REPLICAS: usize = 3;
/// How long a node keeps trying to reach its seeds before giving up.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a shutdown lets requests under way finish, by default: past
/// the default request deadline (2 s), so those end on their own.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest any of a node's durations may be set to (about ten years):
/// far beyond any sensible setting, and small enough that adding it to the
/// current time or counting it in milliseconds cannot overflow.
pub const CONFIG_DURATION_MAX: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Connections a node serves at once by default: each may carry 256
/// streams of 1,024 requests, so an unbounded number would bound nothing.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// The most `--max-connections` may be: far more than a node can serve,
/// and well within what a semaphore can count.
pub const MAX_CONNECTIONS_LIMIT: usize = 1 << 20;
/// Request bytes a node keeps in memory at once by default, in MiB (see
/// `request_memory`); requests beyond it are shed.
pub const DEFAULT_MAX_REQUEST_MEMORY_MB: usize = 1024;
/// The largest `--max-hint-mb`: 1 PiB, far past any disk, so that the
/// bytes it stands for fit in a u64.
pub const MAX_HINT_MB_LIMIT: u64 = 1 << 30;
/// The least `--max-request-memory-mb` may be: the largest request frame
/// must fit in the share large bodies may take (`request_memory::LARGE_SHARE`),
/// or a put of the largest value could never run.
pub const MIN_REQUEST_MEMORY_MB: usize = (FRAME_MAX_BYTES / crate::request_memory::LARGE_SHARE.0
    * crate::request_memory::LARGE_SHARE.1)
    .div_ceil(1 << 20);
const _: () = assert!(MIN_REQUEST_MEMORY_MB == 87);
/// The most `--max-request-memory-mb` may be (1 TiB): far beyond any
/// machine's memory, and far from overflowing a count of bytes.
pub const MAX_REQUEST_MEMORY_MB: usize = 1 << 20;
/// How long to wait for a peer's QUIC handshake.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// Everything a node is started with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub seeds: Vec<SocketAddr>,
    /// N for a new cluster; `None` adopts the cluster's (or 3 for a new one).
    pub replicas: Option<usize>,
    pub vnodes: u32,
    pub sync: bool,
    /// Begin a new epoch whatever the last run was (`--new-epoch`): for a
    /// data dir restored from a copy or snapshot, whose store may be older
    /// than what its last run wrote (see `Storage::begin_epoch`).
    pub new_epoch: bool,
    pub max_value_bytes: usize,
    pub max_siblings: usize,
    /// Client and peer connections served at once; further ones are refused.
    pub max_connections: usize,
    /// MiB of request bodies held at once, across all connections; requests
    /// that would take more are answered `Overloaded` unrun.
    pub max_request_memory_mb: usize,
    /// Run RocksDB's flushes and compactions at the lowest CPU priority
    /// (see `storage::lower_background_priority`); process-wide.
    pub low_background_priority: bool,
    pub join_timeout: Duration,
    /// How long a leave waits for the member it asks to remove the node
    /// before it asks the next (default 5 s; see `server/leave.rs`).
    pub removal_timeout: Duration,
    /// How long [`NodeHandle::shutdown`] lets requests under way finish
    /// before it stops them (`--drain-timeout-s`; zero stops them at once).
    pub drain_timeout: Duration,
    /// Store hints for other nodes and send writes to fallbacks (`--no-hints` turns it off).
    pub hints: bool,
    /// The hint window: hints whose newest write is older are dropped.
    pub hint_ttl: Duration,
    pub max_hints_per_target: u64,
    /// The stored bytes of all hints this node holds, at most, in MiB
    /// (`--max-hint-mb`).
    pub max_hint_mb: u64,
    /// Time between anti-entropy rounds; `None` runs them only on demand.
    pub anti_entropy_interval: Option<Duration>,
    /// How long a tombstone is kept at least (see `ringkv_repair::tombstones`).
    pub tombstone_grace: Duration,
    /// The pace of anti-entropy's key repairs.
    pub repair_keys_per_s: u32,
    /// The share of quorum reads that ask every replica (see `CoordinatorConfig`).
    pub read_repair_chance: f64,
    /// This node's region (`--region`), shown in `status`.
    pub region: Option<String>,
    /// Emulated delays between regions, applied to this node's calls to
    /// peers (`--latency-matrix`); needs `region`.
    pub latency_matrix: Option<Arc<LatencyMatrix>>,
    /// The cluster's shared secret (`--cluster-key-file`): with one, only
    /// processes holding the same key can connect (see `cluster_key`).
    pub cluster_key: Option<ClusterKey>,
    /// Start although the data dir last ran with other cluster keys
    /// (`--cluster-key-replaced`; see `check_cluster_key`).
    pub cluster_key_replaced: bool,
    /// How often the node asks a member for the cluster's record (the
    /// membership exchange; `--membership-exchange-interval-s`).
    pub membership_exchange_interval: Duration,
}

impl NodeConfig {
    /// A node serving on a port of 127.0.0.1 that the OS picks, with the
    /// defaults of [`new`](Self::new): for tests and in-process clusters.
    pub fn on_loopback(id: NodeId, data_dir: PathBuf) -> Self {
        Self::new(id, SocketAddr::from(([127, 0, 0, 1], 0)), data_dir)
    }

    /// A config with defaults for everything but identity and place.
    pub fn new(id: NodeId, listen: SocketAddr, data_dir: PathBuf) -> Self {
        NodeConfig {
            id,
            listen,
            data_dir,
            seeds: Vec::new(),
            replicas: None,
            vnodes: ringkv_ring::DEFAULT_VNODES,
            sync: false,
            new_epoch: false,
            max_value_bytes: ringkv_coordinator::coordinator::DEFAULT_MAX_VALUE_BYTES,
            max_siblings: ringkv_coordinator::replica::DEFAULT_MAX_SIBLINGS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_request_memory_mb: DEFAULT_MAX_REQUEST_MEMORY_MB,
            low_background_priority: true,
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            removal_timeout: leave::DEFAULT_REMOVAL_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            hints: true,
            hint_ttl: Duration::from_secs(hints::DEFAULT_HINT_TTL_S),
            max_hints_per_target: hints::DEFAULT_MAX_HINTS_PER_TARGET,
            max_hint_mb: hints::DEFAULT_MAX_HINT_MB,
            anti_entropy_interval: Some(Duration::from_secs(
                anti_entropy::DEFAULT_ANTI_ENTROPY_INTERVAL_S,
            )),
            tombstone_grace: Duration::from_secs(tombstones::DEFAULT_TOMBSTONE_GRACE_S),
            repair_keys_per_s: anti_entropy::DEFAULT_REPAIR_KEYS_PER_S,
            read_repair_chance: ringkv_coordinator::coordinator::DEFAULT_READ_REPAIR_CHANCE,
            region: None,
            latency_matrix: None,
            cluster_key: None,
            cluster_key_replaced: false,
            membership_exchange_interval: DEFAULT_MEMBERSHIP_EXCHANGE_INTERVAL,
        }
    }

    /// Whether a hint could outlive a collected tombstone and bring its
    /// value back (warned about at start). With `--no-hints` too: hints
    /// already held are still delivered.
    fn grace_is_shorter_than_the_hint_window(&self) -> bool {
        self.tombstone_grace < self.hint_ttl
    }

    fn validate(&self) -> Result<(), NodeError> {
        let bad = |reason: &str| {
            Err(NodeError::Config {
                reason: reason.to_string(),
            })
        };
        let replicas_max = ringkv_ring::REPLICAS_MAX as usize;
        if self.replicas.is_some_and(|n| n == 0 || n > replicas_max) {
            return bad(&format!("--replicas must be from 1 to {replicas_max}"));
        }
        if self.vnodes == 0 || self.vnodes > ringkv_ring::VNODES_MAX {
            return bad(&format!(
                "--vnodes must be from 1 to {}",
                ringkv_ring::VNODES_MAX
            ));
        }
        let durations = [
            ("--join-timeout-s", Some(self.join_timeout)),
            ("--drain-timeout-s", Some(self.drain_timeout)),
            ("--hint-ttl-s", Some(self.hint_ttl)),
            ("--tombstone-grace-s", Some(self.tombstone_grace)),
            ("--anti-entropy-interval-s", self.anti_entropy_interval),
        ];
        for (flag, duration) in durations {
            if duration.is_some_and(|d| d > CONFIG_DURATION_MAX) {
                return bad(&format!(
                    "{flag} must be at most {} (about ten years)",
                    CONFIG_DURATION_MAX.as_secs()
                ));
            }
        }
        if self.max_value_bytes == 0 || self.max_value_bytes > VALUE_MAX_BYTES {
            return bad(&format!(
                "--max-value-bytes must be from 1 to {VALUE_MAX_BYTES} (64 MiB less room for a key's bookkeeping)"
            ));
        }
        if self.max_connections > MAX_CONNECTIONS_LIMIT {
            return bad(&format!(
                "--max-connections must be at most {MAX_CONNECTIONS_LIMIT}"
            ));
        }
        if self.max_connections == 0 {
            return bad("--max-connections must be at least 1");
        }
        if !(MIN_REQUEST_MEMORY_MB..=MAX_REQUEST_MEMORY_MB).contains(&self.max_request_memory_mb) {
            return bad(&format!(
                "--max-request-memory-mb must be from {MIN_REQUEST_MEMORY_MB} (the largest request must fit) to {MAX_REQUEST_MEMORY_MB}"
            ));
        }
        if self.max_siblings == 0 {
            return bad("--max-siblings must be at least 1");
        }
        if self.hint_ttl.is_zero() {
            return bad("--hint-ttl-s must be at least 1 (use --no-hints to store none)");
        }
        if self.max_hints_per_target == 0 {
            return bad("--max-hints-per-target must be at least 1 (use --no-hints to store none)");
        }
        if self.max_hint_mb == 0 || self.max_hint_mb > MAX_HINT_MB_LIMIT {
            return bad(&format!(
                "--max-hint-mb must be 1 to {MAX_HINT_MB_LIMIT} (use --no-hints to store none)"
            ));
        }
        if self.id.as_str().len() > ringkv_core::node_id::NODE_NAME_MAX_BYTES {
            return Err(NodeError::Config {
                reason: format!(
                    "--id is {} bytes long; node names may be at most {} bytes",
                    self.id.as_str().len(),
                    ringkv_core::node_id::NODE_NAME_MAX_BYTES
                ),
            });
        }
        if let Some(region) = &self.region {
            ringkv_core::wire::validate_region(region).map_err(|e| NodeError::Config {
                reason: format!("--region: {}", e.message),
            })?;
        }
        if let Some(matrix) = &self.latency_matrix {
            let Some(region) = &self.region else {
                return bad("--latency-matrix needs --region: the node's own region");
            };
            matrix.check_region(region).map_err(|e| NodeError::Config {
                reason: format!("--region: {e}"),
            })?;
        }
        if self.repair_keys_per_s == 0 {
            return bad("--repair-keys-per-s must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.read_repair_chance) {
            return bad("--read-repair-chance must be a share from 0 to 1");
        }
        if self.tombstone_grace.is_zero() {
            return bad("--tombstone-grace-s must be at least 1");
        }
        if self.listen.ip().is_unspecified() {
            return bad("--listen needs the address peers reach this node at, not 0.0.0.0 or [::]");
        }
        Ok(())
    }
}

/// The local replica, as the transport and the router call it.
pub struct LocalReplica {
    replica: Arc<ReplicaService<Arc<Storage>>>,
}

impl LocalReplica {
    /// Serves a replica request, and answers only once everything it wrote
    /// or read is durable: the WAL records of the writes before it flushed,
    /// together with those of the requests runnable beside it (group
    /// commit). Reads wait too: a tombstone check, or a client, must not act
    /// on a version that a `kill -9` of this replica would then lose. With
    /// nothing buffered the commit returns at once.
    async fn handle(&self, request: ReplicaRequest) -> Response {
        let response = if self.replica.store().is_sync() {
            // An fsync takes milliseconds: keep it off the async workers.
            let replica = self.replica.clone();
            tokio::task::spawn_blocking(move || replica.handle(request))
                .await
                .unwrap_or_else(|e| {
                    // The panic's message is for the log, not for the peer.
                    tracing::error!(error = %e, "a replica request's handler failed");
                    Response::error(ErrorKind::Internal, "the request's handler failed")
                })
        } else {
            self.replica.handle(request)
        };
        once_durable(self.replica.store(), self.replica.id(), response).await
    }
}

/// `answer`, once every write it may reflect is durable
/// ([`Storage::commit`]); an internal error if the WAL cannot be flushed.
async fn once_durable(storage: &Storage, me: &NodeId, answer: Response) -> Response {
    match storage.commit().await {
        Ok(()) => answer,
        Err(e) => Response::error(ErrorKind::Internal, format!("{me}: {e}")),
    }
}

/// The network as this node's coordinator sees it: QUIC to peers, a direct
/// call to itself.
pub struct QuicTransport {
    me: NodeId,
    local: Arc<LocalReplica>,
    membership: Arc<Membership>,
    pool: Arc<PeerPool>,
    /// Emulated regions: this node's region and its links to the others.
    regions: Option<Arc<RegionLinks>>,
    /// Set once a `ringkv leave` of this node has had the members remove
    /// it, for its last hand-over: its replica requests say so, and the
    /// members take them (see [`Request::ReplicaFrom`]).
    leave_last_pass: std::sync::atomic::AtomicBool,
    /// A member that refused a replica request as from a removed node
    /// ([`ErrorKind::SenderRemoved`]): the probe loop asks it for the
    /// cluster's record at its next tick rather than at the next exchange.
    refused_as_removed_by: std::sync::Mutex<Option<NodeId>>,
}

impl QuicTransport {
    /// Drops the pooled connection to `node` (see [`PeerPool::disconnect`]).
    async fn disconnect(&self, node: &NodeId) {
        if let Some(addr) = self.membership.addr_of(node) {
            self.pool.disconnect(addr).await;
        }
    }

    /// A call to whoever serves at `addr` (membership exchanges, joins). A
    /// member's address meets its region's emulated link, as
    /// calls by node id do, so a partition cuts a member's membership
    /// exchanges too. A node not yet in a cluster knows no member's region,
    /// so its join is not emulated; nor is the question whether another
    /// process holds this node's old address (`Identify`), which asks about
    /// this machine, not the network.
    async fn call_addr(&self, addr: SocketAddr, request: &Request) -> Result<Response, CallError> {
        self.call_at(addr, None, request).await
    }

    /// [`Self::call_addr`] for a request meant for member `member` at
    /// `addr`, and for no other node (a removal): it goes only to a node
    /// that says it is that member of this node's cluster (see
    /// [`PeerPool::call_member`]). A new node given the member's old
    /// address, of another cluster whose members have the same names,
    /// would otherwise act on it.
    async fn call_member_at(
        &self,
        member: &NodeId,
        addr: SocketAddr,
        request: &Request,
    ) -> Result<Response, CallError> {
        self.call_at(addr, Some(member), request).await
    }

    async fn call_at(
        &self,
        addr: SocketAddr,
        member: Option<&NodeId>,
        request: &Request,
    ) -> Result<Response, CallError> {
        let peer_region = self
            .regions
            .as_ref()
            .filter(|_| !matches!(request, Request::Identify))
            .and_then(|links| Some((links.clone(), self.membership.region_at(addr)?)));
        let cluster_id = self.membership.cluster_id();
        match (peer_region, member) {
            (Some((links, region)), member) => {
                let (pool, request, member) = (self.pool.clone(), request.clone(), member.cloned());
                over_link(links, region, async move {
                    match member {
                        Some(member) => pool.call_member(addr, &member, cluster_id, &request).await,
                        None => pool.call(addr, &request).await,
                    }
                })
                .await
            }
            (None, Some(member)) => {
                self.pool
                    .call_member(addr, member, cluster_id, request)
                    .await
            }
            (None, None) => self.pool.call(addr, request).await,
        }
    }
}

/// How long an emulated call's task waits for its answer once its caller
/// has stopped waiting (see [`over_link`]).
const OVER_LINK_AFTER_CALLER: Duration = Duration::from_secs(10);

/// `call` (a request's sending, and its answer) over the emulated link to a
/// peer in `region`: the request's leg, the call, the answer's leg. In a
/// task of its own, as a real network's packets are on their own: a caller
/// that gives up while the request is on its way (its deadline) does not
/// take it back, and the peer still gets it. A message the link loses
/// never comes back; the caller's deadline ends the wait, and the task
/// ends at once.
///
/// Bounded: once the caller has gone, the task waits at most
/// `OVER_LINK_AFTER_CALLER` more for the answer (time for the request to
/// be sent; a request sent reaches the peer without its caller), so a peer
/// that never answers does not keep a task, and a copy of the request, per
/// call.
async fn over_link(
    links: Arc<RegionLinks>,
    region: String,
    call: impl std::future::Future<Output = Result<Response, CallError>> + Send + 'static,
) -> Result<Response, CallError> {
    let (_caller_waits, caller_gone) = tokio::sync::oneshot::channel::<()>();
    let carried = tokio::spawn(async move {
        if !links.deliver(&region, true).await {
            return None;
        }
        let gone = async move {
            let _ = caller_gone.await;
            tokio::time::sleep(OVER_LINK_AFTER_CALLER).await;
        };
        let answer = tokio::select! {
            answer = call => answer,
            () = gone => return None,
        };
        // Only an answer travels back: a failure to reach the peer is
        // known here.
        if answer.is_ok() && !links.deliver(&region, false).await {
            return None;
        }
        Some(answer)
    });
    match carried.await {
        Ok(Some(answer)) => answer,
        Ok(None) => std::future::pending().await,
        Err(e) => Err(CallError::Connection(format!(
            "the emulated link's task failed: {e}"
        ))),
    }
}

impl Transport for QuicTransport {
    async fn call(
        &self,
        to: &NodeId,
        request: Request,
    ) -> Result<Response, ringkv_core::TransportError> {
        if *to == self.me {
            return Ok(match request {
                Request::Replica(r) => self.local.handle(r).await,
                Request::Ping => Response::Pong,
                _ => Response::error(ErrorKind::Internal, "only replica requests go to self"),
            });
        }
        let (addr, cluster_id) = self
            .membership
            .route_to(to)
            .ok_or_else(|| ringkv_core::TransportError::UnknownNode { node: to.clone() })?;
        let request = match request {
            Request::Replica(request) => Request::ReplicaFrom {
                from: self.me.clone(),
                leave_last_pass: self
                    .leave_last_pass
                    .load(std::sync::atomic::Ordering::SeqCst),
                request,
            },
            other => other,
        };
        let peer_region = self
            .regions
            .as_ref()
            .and_then(|links| Some((links.clone(), self.membership.region_of(to)?)));
        let answer = match peer_region {
            Some((links, region)) => {
                let (pool, to) = (self.pool.clone(), to.clone());
                over_link(links, region, async move {
                    pool.call_member(addr, &to, Some(cluster_id), &request)
                        .await
                })
                .await
            }
            None => {
                self.pool
                    .call_member(addr, to, Some(cluster_id), &request)
                    .await
            }
        };
        if let Ok(Response::Error(e)) = &answer {
            if e.kind == ErrorKind::SenderRemoved {
                *self
                    .refused_as_removed_by
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(to.clone());
            }
        }
        answer.map_err(|e| ringkv_core::TransportError::Unreachable {
            node: to.clone(),
            reason: e.to_string(),
        })
    }
}

struct NodeInner {
    id: NodeId,
    storage: Arc<Storage>,
    /// Serialises ring installs so an older member list never replaces a newer one.
    install_lock: std::sync::Mutex<()>,
    membership: Arc<Membership>,
    transport: Arc<QuicTransport>,
    local: Arc<LocalReplica>,
    coordinator_config: CoordinatorConfig,
    /// Set once the node is in a cluster; client requests wait for it.
    coordinator: OnceLock<Arc<Coordinator<QuicTransport>>>,
    read_repair: ReadRepairQueue,
    detector: Arc<FailureDetector>,
    hints: Arc<HintBook<Arc<Storage>>>,
    anti_entropy: Arc<AntiEntropy<QuicTransport>>,
    /// The ring each install puts in effect, for the tree rebuilder.
    ring_tx: watch::Sender<Option<Arc<Ring>>>,
    /// When (unix ms) this node last asked a member for its list in an
    /// exchange that answered (then merged into its record): the ring
    /// hand-over dates a change it learns of from the last time the node
    /// was that current, once it has taken in the ring that record gives
    /// (`server/ring_handover.rs`).
    exchanged_unix_ms: std::sync::atomic::AtomicU64,
    /// Whether the ring hand-over owes a pass (`server/ring_handover.rs`):
    /// a leave waits for it. True until the loop has read what it owes
    /// from the data dir.
    handover_owed: std::sync::atomic::AtomicBool,
    /// The rings this node replaced lately (`server/recent_rings.rs`);
    /// `None` until the hand-over loop has read them from the data dir,
    /// and meanwhile no tombstone is collected.
    recent_rings: std::sync::Mutex<Option<recent_rings::RecentRings>>,
    /// Becomes true when the node shuts down.
    shutdown: watch::Receiver<bool>,
    /// Becomes true when this node learns it was removed from the cluster.
    removed: watch::Sender<bool>,
    /// The same, read on every request.
    is_removed: std::sync::atomic::AtomicBool,
    /// Set while `ringkv leave` runs (see `server/leave.rs`); shared with
    /// the coordinator, which then stands in for no owner.
    leaving: Arc<std::sync::atomic::AtomicBool>,
    /// Requests being handled: a leave waits for those under way when it
    /// stopped serving before its last hand-over.
    in_flight: std::sync::atomic::AtomicUsize,
    /// Set when shutdown begins: new requests are refused, those in flight
    /// go on (up to `drain_timeout`).
    draining: std::sync::atomic::AtomicBool,
    /// Set once the drain has waited its `drain_timeout`: work still under
    /// way stops now (a leave's last pass, `server/leave.rs`).
    drain_over: std::sync::atomic::AtomicBool,
    drain_timeout: Duration,
    /// See [`NodeConfig::membership_exchange_interval`].
    membership_exchange_interval: Duration,
    /// Removed senders whose replica requests were refused lately, for
    /// the log (`server/removed_senders.rs`).
    removed_senders: std::sync::Mutex<removed_senders::RemovedSenders>,
    /// How long a leave waits for each member it asks to remove the node.
    removal_timeout: Duration,
    /// Keys a leave has sent to their new replicas so far (in `Stats`, for
    /// the CLI's progress).
    leave_keys_sent: std::sync::atomic::AtomicU64,
    /// Set while `ringkv cleanup` runs (see `server/cleanup.rs`).
    cleaning: std::sync::atomic::AtomicBool,
    /// Keys the running or last cleanup has read (in `Stats`).
    cleanup_keys_scanned: std::sync::atomic::AtomicU64,
    /// The node's stop signal (the sender `NodeHandle::shutdown` uses):
    /// a removed node stops its background loops at once.
    stop: Arc<watch::Sender<bool>>,
    /// `--seed` addresses other than this node's own: a restarted node
    /// announces to them too, and the membership exchange asks one while no
    /// member is believed up, so a cluster whose every address changed at
    /// once (machines replaced, pods rescheduled) finds itself again.
    seeds: Vec<SocketAddr>,
    /// Set once `form_or_join` is done: until then a change of the member
    /// list is stored but not installed, so that a restarted node does not
    /// coordinate with its old ring before it knows it is still a member.
    started: std::sync::atomic::AtomicBool,
    /// Tests: rings the tree rebuilder has decided on (to skip or rebuild),
    /// and of those, to rebuild (counted together).
    #[cfg(test)]
    rings_considered: std::sync::atomic::AtomicU32,
    #[cfg(test)]
    rebuilds_decided: std::sync::atomic::AtomicU32,
    /// Tests: called with each page's keys as a leave's hand-over reads it,
    /// before anything of the page is sent.
    #[cfg(test)]
    leave_page_read: LeavePageHook,
}

#[cfg(test)]
type LeavePageHook = std::sync::Mutex<Option<Box<dyn FnMut(&[Vec<u8>]) + Send>>>;

impl NodeInner {
    /// Why this node keeps no hint for `owner` now (and so answers no read
    /// for it); `None` if it does.
    fn keeps_no_hints_for(&self, owner: &NodeId) -> Option<String> {
        if self.leaving.load(std::sync::atomic::Ordering::Relaxed) {
            // Its hints would leave with it.
            Some(format!(
                "{} is leaving the cluster and keeps no hints",
                self.id
            ))
        } else if self.membership.addr_of(owner).is_none() {
            // Unavailable, not invalid: this node may just not have learned
            // of a new member yet; the coordinator tries another.
            Some(format!(
                "{owner} is not a member of this cluster as {} knows it; no hint is kept for it",
                self.id
            ))
        } else {
            None
        }
    }

    async fn handle(self: Arc<Self>, request: Request) -> Response {
        // Counted before the removal check, and both SeqCst (as is the
        // store in `stop_serving`): a leave that sees no request in flight
        // after it stopped serving knows every later one sees it stopped.
        let _in_flight = InFlight::count(&self.in_flight);
        if self.draining.load(std::sync::atomic::Ordering::SeqCst)
            && !matches!(request, Request::Status | Request::Stats)
        {
            // Refused before anything ran, so the client may safely send it
            // to another node. Pings too: peers' failure detectors then
            // count this node down and send its writes to stand-ins rather
            // than have each refused.
            return Response::error(
                ErrorKind::NotServing,
                format!("{} is shutting down; ask another node", self.id),
            );
        }
        if self.is_removed.load(std::sync::atomic::Ordering::SeqCst)
            && !matches!(
                request,
                Request::Ping | Request::Identify | Request::Status | Request::Stats
            )
        {
            // Its ring is stale and its data may be: it must not coordinate,
            // serve as a replica or push repairs any more.
            return Response::error(
                ErrorKind::NotServing,
                format!("{} was removed from the cluster; ask another node", self.id),
            );
        }
        let request = match request {
            Request::ReplicaFrom {
                from,
                leave_last_pass,
                request,
            } => {
                if !leave_last_pass && self.membership.is_removed(&from) {
                    metrics::counter!("ringkv_requests_from_removed_total").increment(1);
                    let log = self
                        .removed_senders
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .should_log(&from, std::time::Instant::now());
                    if log {
                        tracing::warn!(%from, "refused replica requests from a node removed from the cluster: it should learn of its removal and stop by itself; if it goes on, stop it by hand");
                    }
                    return Response::error(
                        ErrorKind::SenderRemoved,
                        format!(
                            "{from} was removed from the cluster; {} takes no replica requests from it",
                            self.id
                        ),
                    );
                }
                Request::Replica(request)
            }
            Request::Replica(_) => {
                return Response::error(
                    ErrorKind::InvalidRequest,
                    "a replica request from the network names its sender (ReplicaFrom)",
                )
            }
            other => other,
        };
        if let Request::Replica(
            ReplicaRequest::Hint { owner, .. }
            | ReplicaRequest::Read {
                hint_for: Some(owner),
                ..
            },
        ) = &request
        {
            // A read for an owner is answered only where a hint for it
            // would be kept: elsewhere its "nothing" would count toward R
            // although the owner's hint went to another fallback.
            if let Some(why) = self.keeps_no_hints_for(owner) {
                return Response::error(ErrorKind::Unavailable, why);
            }
        }
        match request {
            Request::Put(p) => match self.coordinator.get() {
                Some(c) => c.put(p).await,
                None => joining(&self.id),
            },
            Request::Get(g) => match self.coordinator.get() {
                Some(c) => c.get(g).await,
                None => joining(&self.id),
            },
            Request::Replica(
                r @ (ReplicaRequest::TreeHashes { .. } | ReplicaRequest::LeafItems { .. }),
            ) => {
                // Leaf listings read RocksDB: off the async workers.
                let anti_entropy = self.anti_entropy.clone();
                let answer = tokio::task::spawn_blocking(move || anti_entropy.answer(&r))
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| Response::error(ErrorKind::Internal, "tree answer failed"));
                // Like every replica answer, it may reflect buffered writes.
                once_durable(&self.storage, &self.id, answer).await
            }
            Request::Replica(ReplicaRequest::Update { .. }) => {
                // A coordinator mints versions on itself only, never over
                // the network (see `QuicTransport::call`); taking one from a
                // connection would skip the put's checks (value size, the
                // context token's cluster and key).
                Response::error(
                    ErrorKind::InvalidRequest,
                    "Update is a coordinator's request to itself; send a Put",
                )
            }
            Request::Replica(ReplicaRequest::Handoff { key, clock }) => {
                let ring = self.ring_tx.borrow().clone();
                match ringkv_coordinator::replica::handoff_refusal(ring.as_deref(), &self.id, &key)
                {
                    Some(refusal) => refusal,
                    None => {
                        self.local
                            .handle(ReplicaRequest::Handoff { key, clock })
                            .await
                    }
                }
            }
            Request::Replica(r) => self.local.handle(r).await,
            // Unwrapped into `Replica` above, once its sender was checked.
            Request::ReplicaFrom { .. } => Response::error(
                ErrorKind::Internal,
                "a replica request reached its handler unchecked",
            ),
            Request::Repair => self.repair_on_request().await,
            Request::Ping => Response::Pong,
            Request::Identify => Response::Identity(Identity {
                node: self.id.clone(),
                cluster_id: self.membership.cluster_id(),
            }),
            Request::Join(j) => {
                if let Some(refusal) = self.region_unknown(j.member.region.as_deref()) {
                    return refusal;
                }
                let (response, changed) = self.membership.handle_join(j);
                if changed {
                    self.install_if_started();
                }
                response
            }
            Request::Remove { node, tell_others } => self.remove_member(node, tell_others).await,
            Request::Leave => self.leave().await,
            Request::Cleanup => self.cleanup().await,
            Request::Status => self.status().await,
            Request::Stats => Response::Stats(self.stats()),
        }
    }

    /// The refusal of a join from a node in `region` when this node
    /// emulates regions and its latency matrix lacks that one: its links to
    /// the node would silently take no delay (nor could a partition cut it
    /// off). A refusal: the joining node fails to start at once with this
    /// reason (exit 2); once the matrices agree (SIGHUP reloads the seed's),
    /// start it again.
    fn region_unknown(&self, region: Option<&str>) -> Option<Response> {
        let (links, region) = (self.transport.regions.as_ref()?, region?);
        let unknown = links.matrix().check_region(region).err()?;
        Some(Response::error(
            ErrorKind::Refused,
            format!(
                "{}'s latency matrix lacks the joining node's --region: {unknown}; give every node one matrix",
                self.id
            ),
        ))
    }

    fn stats(&self) -> NodeStats {
        let removed = self.is_removed.load(std::sync::atomic::Ordering::SeqCst);
        NodeStats {
            hints_pending: self.hints.pending_total(),
            last_exchange_unix_ms: self.anti_entropy.last_round_unix_ms(),
            keys_repaired: self.anti_entropy.keys_repaired(),
            leave_keys_sent: self
                .leave_keys_sent
                .load(std::sync::atomic::Ordering::Relaxed),
            // Once removed it is no longer leaving but gone (see `removed`).
            leaving: self.leaving.load(std::sync::atomic::Ordering::SeqCst) && !removed,
            removed,
            cleanup_keys_scanned: self
                .cleanup_keys_scanned
                .load(std::sync::atomic::Ordering::Relaxed),
            cleaning: self.cleaning.load(std::sync::atomic::Ordering::SeqCst) && !removed,
        }
    }

    /// Every key this node stores with its versions, a page at a time (see
    /// [`StoredPages`]).
    fn stored_pages(&self) -> StoredPages {
        StoredPages::scan(self.storage.clone())
    }

    /// A round asked for by a client (`ringkv repair`). Like the periodic
    /// ones it stops at shutdown, so that it does not hold the node, and
    /// with it the record of a clean shutdown, for as long as it is paced.
    async fn repair_on_request(&self) -> Response {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            report = self.repair_round() => Response::Repair(report),
            _ = shutdown.wait_for(|stop| *stop) => Response::error(
                ErrorKind::Unavailable,
                format!("{} is shutting down; the repair round stopped", self.id),
            ),
        }
    }

    /// One anti-entropy round against every other member.
    async fn repair_round(&self) -> ringkv_core::wire::RepairReport {
        let detector = self.detector.clone();
        self.anti_entropy
            .round(&move |p: &NodeId| detector.is_up(p))
            .await
    }

    /// This node learned that it was removed: it refuses every request but
    /// status, stops its background loops (it still accepts connections,
    /// to say so) and tells `NodeHandle::removed`.
    fn on_removed(&self) {
        // During a leave the removal is expected; the leave still has its
        // last hand-over to do and its answer to give.
        // (SeqCst: see `LeavingGuard`, which tells if the leave fails.)
        if self.stop_serving() && !self.leaving.load(std::sync::atomic::Ordering::SeqCst) {
            self.removed.send_replace(true);
        }
    }

    /// Refuses every request but status from now on and stops the
    /// background loops; true the first time. A node that left
    /// (`ringkv leave`) does only this: it stays up until its operator
    /// stops it, so that its answer reaches the client.
    fn stop_serving(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.is_removed.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.stop.send_replace(true);
        true
    }

    /// Serves `ringkv remove`: takes `node` out of the cluster and, for a
    /// client (`tell_others`), tells every other member at once rather than
    /// leave it to the membership exchange. The answer is the member list
    /// afterwards and the members that could not be told (they learn at
    /// their next exchange).
    async fn remove_member(&self, node: NodeId, tell_others: bool) -> Response {
        if tell_others && node != self.id {
            if let Some(refusal) = self.hints_held_by(&node).await {
                return refusal;
            }
        }
        let (reply, changed) = match self.membership.remove(&node, tell_others) {
            Ok(done) => done,
            Err((kind, message)) => return Response::error(kind, message),
        };
        let mut not_told = Vec::new();
        if changed {
            tracing::warn!(%node, "removed from the cluster");
            // Not before start-up has settled whether this node is still a
            // member (its announce window): it then installs the record.
            self.install_if_started();
        }
        if tell_others {
            let mut tells = tokio::task::JoinSet::new();
            for member in reply.members.iter().filter(|m| m.id != self.id) {
                let Ok(addr) = member.addr.parse::<SocketAddr>() else {
                    continue;
                };
                let (transport, peer) = (self.transport.clone(), member.id.clone());
                let request = Request::Remove {
                    node: node.clone(),
                    tell_others: false,
                };
                tells.spawn(async move {
                    let told = tokio::time::timeout(
                        ANNOUNCE_TIMEOUT,
                        transport.call_member_at(&peer, addr, &request),
                    )
                    .await;
                    (peer, told)
                });
            }
            while let Some(joined) = tells.join_next().await {
                let Ok((peer, told)) = joined else { continue };
                let reason = match told {
                    Ok(Ok(Response::Removed(_))) => continue,
                    Ok(Ok(Response::Error(e))) => format!("refused: {}", e.message),
                    Ok(Ok(other)) => format!("unexpected answer {other:?}"),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer in time".to_string(),
                };
                tracing::warn!(%peer, %reason, "could not tell a member of the removal; it learns at its next membership exchange");
                not_told.push(ringkv_core::wire::PeerFailure { peer, reason });
            }
        }
        not_told.sort_by(|a, b| a.peer.cmp(&b.peer));
        Response::Removed(ringkv_core::wire::RemoveReply {
            record: reply,
            not_told,
        })
    }

    /// The refusal of `ringkv remove` for a member that is running and
    /// holds hints: removed, it stops its loops, and those hints (stand-in
    /// writes that counted toward W, perhaps their only copy) would never
    /// be delivered. A member that is down, or does not answer in time, is
    /// not asked (removal is for those). A hint stored between this check
    /// and the removal is lost with the node, as with any removal.
    async fn hints_held_by(&self, node: &NodeId) -> Option<Response> {
        self.membership.route_to(node)?;
        let asked =
            tokio::time::timeout(STATS_TIMEOUT, self.transport.call(node, Request::Stats)).await;
        let Ok(Ok(Response::Stats(stats))) = asked else {
            return None;
        };
        (stats.hints_pending > 0).then(|| {
            Response::error(
                ErrorKind::Refused,
                format!(
                    "{node} is running and holds {} hints for other members, which a removal would leave undelivered; \
                     wait for them to be delivered (its `ringkv_hints_pending` metric is 0: bring their members back, or remove those first), or stop it first",
                    stats.hints_pending
                ),
            )
        })
    }

    /// The rings this node replaced lately (`None` until the hand-over loop
    /// has read them). Every holder leaves them whole, so a panic elsewhere
    /// cannot have left them half-changed.
    fn recent_rings(&self) -> std::sync::MutexGuard<'_, Option<recent_rings::RecentRings>> {
        self.recent_rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Self::install`], once the node is started (see `started`).
    fn install_if_started(&self) {
        if self.started.load(std::sync::atomic::Ordering::Acquire) {
            self.install();
        }
    }

    /// Puts the newest cluster record into effect. Whoever calls, the ring
    /// is built from membership's current record under a lock, so two
    /// concurrent installs cannot leave an older ring in place.
    fn install(&self) {
        let _guard = self.install_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(record) = self.membership.record() else {
            return;
        };
        let ring = match record.ring() {
            Ok(ring) => Arc::new(ring),
            Err(e) => {
                tracing::error!(error = %e, "membership produced an invalid ring");
                return;
            }
        };
        metrics::gauge!("ringkv_members").set(record.members.len() as f64);
        self.ring_tx.send_replace(Some(ring.clone()));
        match self.coordinator.get() {
            Some(c) => c.set_ring(ring),
            None => {
                let coordinator = Arc::new(
                    Coordinator::new(
                        self.id.clone(),
                        record.cluster_id,
                        ring,
                        self.transport.clone(),
                        self.coordinator_config.clone(),
                    )
                    .with_read_repair(self.read_repair.clone())
                    .with_failure_detector(self.detector.clone())
                    .with_leaving_flag(self.leaving.clone())
                    .with_wall_clock(Arc::new(crate::storage::unix_ms)),
                );
                // Installs are serialised, so nobody else can have set it.
                let _ = self.coordinator.set(coordinator);
            }
        }
    }

    /// The members, whether this node's failure detector believes each is
    /// up, and each one's counters (asked of every member believed up, at
    /// once, each for at most [`STATS_TIMEOUT`]).
    async fn status(&self) -> Response {
        let Some(record) = self.membership.record() else {
            return joining(&self.id);
        };
        let mut asks = tokio::task::JoinSet::new();
        for m in record.members.values() {
            if m.id == self.id || !self.detector.is_up(&m.id) {
                continue;
            }
            let (id, transport) = (m.id.clone(), self.transport.clone());
            asks.spawn(async move {
                let answer =
                    tokio::time::timeout(STATS_TIMEOUT, transport.call(&id, Request::Stats)).await;
                match answer {
                    Ok(Ok(Response::Stats(stats))) => (id, Some(stats)),
                    _ => (id, None),
                }
            });
        }
        let mut stats = std::collections::HashMap::new();
        stats.insert(self.id.clone(), self.stats());
        while let Some(joined) = asks.join_next().await {
            if let Ok((id, Some(answer))) = joined {
                stats.insert(id, answer);
            }
        }
        Response::Status(StatusReply {
            node: self.id.clone(),
            replicas: record.replicas as u32,
            nodes: record
                .members
                .values()
                .map(|m| NodeStatus {
                    id: m.id.clone(),
                    addr: m.addr.clone(),
                    up: m.id == self.id || self.detector.is_up(&m.id),
                    region: m.region.clone(),
                    vnodes: m.vnodes,
                    hints_pending: stats.get(&m.id).map(|s| s.hints_pending),
                    last_exchange_unix_ms: stats.get(&m.id).and_then(|s| s.last_exchange_unix_ms),
                    keys_repaired: stats.get(&m.id).map(|s| s.keys_repaired),
                    leaving: stats.get(&m.id).map(|s| s.leaving),
                    cleaning: stats.get(&m.id).map(|s| s.cleaning),
                })
                .collect(),
        })
    }
}

/// How long `status` waits for a peer's counters.
const STATS_TIMEOUT: Duration = Duration::from_millis(500);

/// How often the probe loop wakes to see which peers are due.
const PROBE_TICK: Duration = Duration::from_millis(250);

/// Probes peers for the failure detector, and every few seconds exchanges
/// the member list with one peer, until shutdown. One round at a time, each
/// bounded by the probe or announce timeout.
async fn probe_loop(inner: Arc<NodeInner>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PROBE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interval = inner.membership_exchange_interval;
    let mut next_exchange = tokio::time::Instant::now() + interval;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        let Some(record) = inner.membership.record() else {
            continue;
        };
        let peers: Vec<NodeId> = record
            .members
            .keys()
            .filter(|id| **id != inner.id)
            .cloned()
            .collect();
        for (peer, up) in probe_round(&inner.detector, &inner.transport, &peers).await {
            tracing::info!(%peer, state = if up { "up" } else { "down" }, "peer state changed");
            if !up {
                inner.transport.disconnect(&peer).await;
            }
            metrics::counter!("ringkv_peer_state_changes_total", "to" => if up { "up" } else { "down" }).increment(1);
        }
        let down = peers.iter().filter(|p| !inner.detector.is_up(p)).count();
        metrics::gauge!("ringkv_peers_down").set(down as f64);
        let refused_by = inner
            .transport
            .refused_as_removed_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(member) = refused_by.and_then(|id| record.members.get(&id)) {
            // A member refused this node as removed: ask that member for
            // the record now, which tells this node if it was (and it then
            // stops) rather than trusting one refusal. At most once a tick;
            // the regular exchange keeps its time, so that a member that
            // refuses but does not answer announces starves no other.
            announce_to(&inner, &record, member).await;
        } else if tokio::time::Instant::now() >= next_exchange {
            exchange_membership(&inner).await;
            next_exchange = tokio::time::Instant::now() + interval;
        }
    }
}

/// The failure detector's settings: the defaults, but with a probe timeout
/// that allows the longest round trip an emulated latency matrix can
/// take, plus the default's margin: a peer across a slower link would
/// otherwise fail every probe and count as down for good. (The matrix the
/// node starts with; one loaded later by SIGHUP does not change it.)
fn detector_config(matrix: Option<&LatencyMatrix>) -> DetectorConfig {
    let mut config = DetectorConfig::default();
    if let Some(matrix) = matrix {
        let round_trip = Duration::from_secs_f64(matrix.longest_round_trip_ms() / 1000.0);
        config.probe_timeout += round_trip;
    }
    config
}

/// The wait before retrying a failed tree rebuild, doubling up to the most.
const REBUILD_RETRY_FIRST: Duration = Duration::from_secs(1);
const REBUILD_RETRY_MOST: Duration = Duration::from_secs(60);

/// Rebuilds the Merkle trees from the store for every ring an install puts
/// in effect that places keys differently (several installs in quick
/// succession give one rebuild), on the blocking pool, until shutdown. A
/// rebuild that fails (a read error, a panic) is tried again after a wait that
/// doubles, from 1 s up to a minute, or at once for a new ring: until one
/// succeeds the trees are not ready and anti-entropy skips this node.
async fn rebuild_loop(inner: Arc<NodeInner>, mut shutdown: watch::Receiver<bool>) {
    let mut rings = inner.ring_tx.subscribe();
    // An install may have come before this task first ran: treat the
    // current ring as new.
    rings.mark_changed();
    let mut retry_in: Option<Duration> = None;
    loop {
        tokio::select! {
            // A scan can take seconds: never start one once shutdown is due.
            biased;
            _ = shutdown.changed() => break,
            changed = rings.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(retry_in.unwrap_or_default()), if retry_in.is_some() => {}
        }
        let Some(ring) = rings.borrow_and_update().clone() else {
            continue;
        };
        let (storage, trees) = (inner.storage.clone(), inner.anti_entropy.trees().clone());
        // Tests: counted once decided, a rebuild with it, so that a test
        // that sees the count sees the decision to rebuild too.
        #[cfg(test)]
        let considered = |rebuild: bool| {
            use std::sync::atomic::Ordering::SeqCst;
            inner.rebuilds_decided.fetch_add(u32::from(rebuild), SeqCst);
            inner.rings_considered.fetch_add(1, SeqCst)
        };
        if trees.is_current_for(&ring) {
            // The same placement (a member only moved, say): the trees stay
            // as they are, and in service.
            retry_in = None;
            #[cfg(test)]
            considered(false);
            continue;
        }
        #[cfg(test)]
        considered(true);
        let started = std::time::Instant::now();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut rebuild = tokio::task::spawn_blocking({
            let stop = stop.clone();
            move || storage.rebuild_trees(&trees, ring, &stop)
        });
        let rebuilt = tokio::select! {
            rebuilt = &mut rebuild => rebuilt,
            _ = shutdown.changed() => {
                // The scan ends at its next check and installs nothing;
                // shutdown waits that long, not for the whole store.
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let _ = rebuild.await;
                break;
            }
        };
        let wait = retry_in.map_or(REBUILD_RETRY_FIRST, |w| (w * 2).min(REBUILD_RETRY_MOST));
        let error = match rebuilt {
            Ok(Ok(keys)) => {
                let seconds = started.elapsed().as_secs_f64();
                metrics::histogram!("ringkv_merkle_rebuild_seconds").record(seconds);
                tracing::info!(keys, seconds, "Merkle trees rebuilt");
                retry_in = None;
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the rebuild panicked: {e}"),
        };
        metrics::counter!("ringkv_merkle_rebuild_failures_total").increment(1);
        tracing::error!(%error, retry_in_s = wait.as_secs(), "Merkle tree rebuild failed; anti-entropy skips this node until a rebuild succeeds");
        retry_in = Some(wait);
    }
}

/// Runs an anti-entropy round every `interval` (never, if `None`) until shutdown.
async fn anti_entropy_loop(
    inner: Arc<NodeInner>,
    interval: Option<Duration>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(interval) = interval else {
        return;
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        tokio::select! {
            report = inner.repair_round() => {
                tracing::debug!(keys_repaired = report.keys_repaired, failures = report.failures.len(), "anti-entropy round");
            }
            _ = shutdown.changed() => break,
        }
    }
}

fn joining(id: &NodeId) -> Response {
    Response::error(
        ErrorKind::NotServing,
        format!("{id} is still joining the cluster; retry shortly"),
    )
}

/// A started node.
pub struct Node;

/// Controls a running node.
pub struct NodeHandle {
    id: NodeId,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    shutdown: Arc<watch::Sender<bool>>,
    stop_accepting: watch::Sender<bool>,
    /// Tells every served stream to answer what it has read and finish;
    /// each holds a receiver until it has (see `quic::serve_stream`).
    finish_streams: Arc<watch::Sender<bool>>,
    accept_loop: JoinHandle<()>,
    repair_worker: JoinHandle<()>,
    prober: JoinHandle<()>,
    handoff: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    inner: Arc<NodeInner>,
}

/// The longest `NodeHandle::shutdown` waits for any one thing to let go.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

impl NodeHandle {
    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// The address the node serves on (with the real port if 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The ring this node has in effect; `None` before it is in a cluster.
    pub fn ring(&self) -> Option<Arc<Ring>> {
        self.inner.ring_tx.borrow().clone()
    }

    /// Puts `matrix` in effect for this node's calls to peers from now on
    /// (`ringkv node` re-reads its `--latency-matrix` file on SIGHUP): how
    /// an emulated partition is made and healed while the cluster runs (see
    /// `region_links`). Refused, and the old matrix kept, for a node started
    /// without a matrix, or a matrix that lacks the node's region or a
    /// member's: calls to a member in a region the matrix lacks meet no
    /// emulated link at all, so a misspelt region would quietly lift a cut.
    pub fn replace_latency_matrix(&self, matrix: LatencyMatrix) -> Result<(), NodeError> {
        let Some(links) = &self.inner.transport.regions else {
            return Err(NodeError::Config {
                reason: "this node was started without --latency-matrix, so it emulates no \
                         regions; restart it with --region and --latency-matrix"
                    .to_string(),
            });
        };
        // This node's own region is checked by `replace`, with the plainer
        // message.
        let record = self.inner.membership.record();
        let members = record.iter().flat_map(|r| r.members.values());
        for member in members.filter(|m| m.id != self.id) {
            if let Some(region) = &member.region {
                matrix.check_region(region).map_err(|e| NodeError::Config {
                    reason: format!(
                        "--latency-matrix lacks the region of member {}: {e}",
                        member.id
                    ),
                })?;
            }
        }
        links.replace(matrix).map_err(|e| NodeError::Config {
            reason: format!("--latency-matrix lacks this node's --region: {e}"),
        })
    }

    /// Returns once this node has learned that it was removed from the
    /// cluster (`ringkv remove` on another member): it must then stop, as
    /// `ringkv node` does. Never returns otherwise.
    pub fn removed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut removed = self.inner.removed.subscribe();
        async move {
            if removed.wait_for(|removed| *removed).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Drains the node and stops it: stops the background loops and
    /// accepting connections; refuses new requests ("shutting down; ask
    /// another node": nothing ran, so a client may resend) while those under
    /// way finish, for up to the drain timeout; stops what is still running
    /// and what earlier requests left behind; lets every connection's
    /// answers reach the client; closes the connections; waits for the
    /// loops; and closes the database once the last request handler has let
    /// go of it (so the data dir can be removed or reopened as soon as this
    /// returns).
    pub async fn shutdown(self) {
        use std::sync::atomic::Ordering;
        let _ = self.shutdown.send(true);
        let _ = self.stop_accepting.send(true);
        // The drain: a rolling restart should cost clients no request that
        // was already running.
        self.inner.draining.store(true, Ordering::SeqCst);
        // Requests, and the sends, late hints and read-repair collection
        // they left running (an acknowledged W=1 write still on its way to
        // the other replicas).
        let coordinator = self.inner.coordinator.get();
        let running = || {
            self.inner.in_flight.load(Ordering::SeqCst)
                + coordinator.map_or(0, |c| c.tasks_running())
        };
        let deadline = tokio::time::Instant::now() + self.inner.drain_timeout;
        while running() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.inner.drain_over.store(true, Ordering::SeqCst);
        let running = running();
        if running > 0 {
            tracing::info!(
                running,
                drain_timeout_s = self.inner.drain_timeout.as_secs_f64(),
                "requests (or tasks they left) still under way after the drain timeout; stopping them"
            );
        }
        if let Some(coordinator) = coordinator {
            // Requests still under way answer "shut down while serving",
            // and they and the sends and hints they left behind let go of
            // the transport, and with it the database, now rather than at
            // their deadline. Each stops at its next await.
            if tokio::time::timeout(SHUTDOWN_WAIT, coordinator.close())
                .await
                .is_err()
            {
                tracing::warn!("requests still running at shutdown after {SHUTDOWN_WAIT:?}");
            }
        }
        // Closing a connection discards what it has not sent yet: first let
        // each stream send its answers and hear them acknowledged.
        // `send_replace`: stored even with no stream to tell, so that a
        // connection whose handshake ends later is told too.
        self.finish_streams.send_replace(true);
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, self.finish_streams.closed()).await;
        self.endpoint.close(0u32.into(), b"shutting down");
        let _ = self.accept_loop.await;
        let _ = self.repair_worker.await;
        let _ = self.prober.await;
        let _ = self.handoff.await;
        for task in self.background {
            let _ = task.await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        // Handlers of the connections just closed end within moments; each
        // holds the node (and so the database) until it does.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while Arc::strong_count(&self.inner) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if Arc::strong_count(&self.inner) > 1 {
            // A handler may still mint a dot, and its record may never be
            // fsynced: not a clean shutdown (the next start keeps the epoch
            // only if the machine has not restarted meanwhile).
            tracing::warn!(
                "request handlers still running at shutdown; the database closes when they end, and the shutdown is not recorded as clean"
            );
        } else if let Err(e) = self.inner.storage.mark_clean_shutdown() {
            // The mark is an fsynced write: it flushes every buffered
            // record before it.
            tracing::warn!(error = %e, "could not record a clean shutdown");
        }
        // A storage call on the blocking pool (an fsync with --sync, a hint
        // batch) runs to its end even when the future that waited for it was
        // dropped, and holds the database until then: moments.
        let storage = Arc::downgrade(&self.inner.storage);
        drop(self.inner);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
        while storage.strong_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if storage.strong_count() > 0 {
            tracing::warn!("the database is still in use after {SHUTDOWN_WAIT:?}; it closes when its last user ends");
        }
    }
}

impl Node {
    /// Starts a node and returns once it is serving and in a cluster. A
    /// data dir that holds files no store has is refused before anything
    /// is written (see [`check_data_dir`](crate::storage::check_data_dir),
    /// which also says why a failed start leaves its store).
    pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
        config.validate()?;
        crate::storage::check_wall_clock(crate::storage::unix_ms())?;
        crate::storage::check_data_dir(&config.data_dir)?;
        let (handle, inner) = Node::assemble(&config).await?;
        let keys = config.cluster_key.as_ref().map(ClusterKey::fingerprints);
        let result = form_or_join(&inner, &config).await;
        // Remembered once the node is in, with the keys it holds now (a
        // key change moves on a step).
        let result = result.and_then(|()| match inner.storage.cluster_keys()? {
            before if before.as_slice() == keys.as_deref().unwrap_or_default() => Ok(()),
            _ => inner
                .storage
                .set_cluster_keys(keys.as_deref().unwrap_or_default()),
        });
        // Shutdown waits for every holder of the node and of its database
        // but the handle; `assemble`'s locals are gone with its frame.
        drop(inner);
        if let Err(e) = result {
            handle.shutdown().await;
            return Err(e);
        }
        tracing::info!(node = %config.id, addr = %handle.addr, "serving");
        Ok(handle)
    }

    /// Opens the store, binds the endpoint and starts every loop: a node
    /// that serves but is in no cluster yet.
    async fn assemble(config: &NodeConfig) -> Result<(NodeHandle, Arc<NodeInner>), NodeError> {
        if config.low_background_priority {
            crate::storage::lower_background_priority()?;
        }
        let storage = Arc::new(Storage::open(&config.data_dir, config.sync)?);
        // Before anything is served.
        if !config.cluster_key_replaced {
            let keys = config.cluster_key.as_ref().map(ClusterKey::fingerprints);
            check_cluster_key(&storage, keys.as_deref())?;
        }

        let listen_err = |e: std::io::Error| NodeError::Listen {
            addr: config.listen.to_string(),
            reason: e.to_string(),
        };
        let mut endpoint = quinn::Endpoint::new(
            crate::endpoint_keys::endpoint_config(&storage.reset_secret()?),
            Some(tls::server_config(config.cluster_key.as_ref())?),
            std::net::UdpSocket::bind(config.listen).map_err(listen_err)?,
            quinn::default_runtime()
                .ok_or_else(|| listen_err(std::io::Error::other("no async runtime")))?,
        )
        .map_err(listen_err)?;
        endpoint.set_default_client_config(tls::client_config(config.cluster_key.as_ref())?);
        let addr = endpoint.local_addr().map_err(|e| NodeError::Listen {
            addr: config.listen.to_string(),
            reason: e.to_string(),
        })?;

        let me = Member {
            id: config.id.clone(),
            addr: addr.to_string(),
            vnodes: config.vnodes,
            region: config.region.clone(),
            incarnation: storage.next_incarnation()?,
        };
        let membership = Arc::new(Membership::load(storage.clone(), me, config.replicas)?);
        let boot_id = crate::storage::current_boot_id();
        let epoch = if config.new_epoch {
            storage.begin_new_epoch(boot_id.as_deref())?
        } else {
            storage.begin_epoch(boot_id.as_deref())?
        };
        let hints = Arc::new(
            HintBook::open(
                storage.clone(),
                HintConfig {
                    ttl_ms: millis(config.hint_ttl),
                    max_per_target: config.max_hints_per_target,
                    max_bytes: config.max_hint_mb * 1024 * 1024,
                },
                Arc::new(unix_ms),
            )
            .map_err(|e| NodeError::StorageIo {
                reason: e.to_string(),
            })?,
        );
        // Until the first install the trees know only this node; the
        // rebuilder replaces the ring (and fills the trees) at every install.
        let solo =
            Arc::new(
                Ring::new([(config.id.clone(), 1)], 1).map_err(|e| NodeError::Config {
                    reason: e.to_string(),
                })?,
            );
        let trees = Arc::new(
            ReplicaTrees::new(config.id.clone(), solo, DEFAULT_LEAF_BITS).map_err(|e| {
                NodeError::Config {
                    reason: e.to_string(),
                }
            })?,
        );
        let mut replica =
            ReplicaService::new(config.id.actor(epoch), storage.clone(), config.max_siblings)
                .with_observer(trees.clone());
        if config.hints {
            replica = replica.with_hints(hints.clone());
        }
        let replica = Arc::new(replica);
        let local = Arc::new(LocalReplica { replica });
        let transport = Arc::new(QuicTransport {
            me: config.id.clone(),
            leave_last_pass: Default::default(),
            refused_as_removed_by: Default::default(),
            local: local.clone(),
            membership: membership.clone(),
            pool: Arc::new(PeerPool::new(endpoint.clone(), PEER_CONNECT_TIMEOUT)),
            regions: match (&config.latency_matrix, &config.region) {
                (Some(matrix), Some(region)) => Some(Arc::new(
                    RegionLinks::new(matrix.clone(), region.clone()).map_err(|e| {
                        NodeError::Config {
                            reason: format!("--region: {e}"),
                        }
                    })?,
                )),
                _ => None,
            },
        });
        let transport_for_repair = transport.clone();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shutdown = Arc::new(shutdown);
        let (read_repair, repair_worker) = ReadRepairQueue::start(
            transport.clone(),
            read_repair::DEFAULT_QUEUE_CAPACITY,
            shutdown_rx.clone(),
        );
        let inner = Arc::new(NodeInner {
            id: config.id.clone(),
            storage: storage.clone(),
            install_lock: std::sync::Mutex::new(()),
            membership: membership.clone(),
            transport,
            local,
            coordinator_config: CoordinatorConfig {
                max_value_bytes: config.max_value_bytes,
                hinted_handoff: config.hints,
                read_repair_chance: config.read_repair_chance,
            },
            coordinator: OnceLock::new(),
            read_repair,
            detector: Arc::new(FailureDetector::new(detector_config(
                config.latency_matrix.as_deref(),
            ))),
            hints: hints.clone(),
            anti_entropy: Arc::new(AntiEntropy::new(
                trees.clone(),
                storage.clone(),
                transport_for_repair,
                AntiEntropyConfig {
                    keys_per_s: config.repair_keys_per_s,
                    ..AntiEntropyConfig::default()
                },
                Arc::new(unix_ms),
            )),
            ring_tx: watch::channel(None).0,
            exchanged_unix_ms: Default::default(),
            handover_owed: true.into(),
            recent_rings: std::sync::Mutex::new(None),
            shutdown: shutdown_rx.clone(),
            removed: watch::Sender::new(false),
            is_removed: Default::default(),
            leaving: Default::default(),
            in_flight: Default::default(),
            draining: Default::default(),
            drain_over: Default::default(),
            drain_timeout: config.drain_timeout,
            membership_exchange_interval: config.membership_exchange_interval,
            removed_senders: Default::default(),
            removal_timeout: config.removal_timeout,
            leave_keys_sent: Default::default(),
            cleaning: Default::default(),
            cleanup_keys_scanned: Default::default(),
            seeds: config
                .seeds
                .iter()
                .copied()
                .filter(|seed| *seed != config.listen)
                .collect(),
            started: Default::default(),
            stop: shutdown.clone(),
            #[cfg(test)]
            rings_considered: Default::default(),
            #[cfg(test)]
            rebuilds_decided: Default::default(),
            #[cfg(test)]
            leave_page_read: Default::default(),
        });
        let background = vec![
            tokio::spawn(rebuild_loop(inner.clone(), shutdown_rx.clone())),
            tokio::spawn(anti_entropy_loop(
                inner.clone(),
                config.anti_entropy_interval,
                shutdown_rx.clone(),
            )),
            tokio::spawn(tombstone_gc::tombstone_loop(
                inner.clone(),
                config.tombstone_grace,
                shutdown_rx.clone(),
            )),
            tokio::spawn(ring_handover::ring_handover_loop(
                inner.clone(),
                // Taken now, before the start merges what members know.
                inner
                    .membership
                    .record()
                    .and_then(|record| record.ring().ok())
                    .map(Arc::new),
                config.repair_keys_per_s,
                config.tombstone_grace,
                shutdown_rx.clone(),
            )),
        ];
        if config.grace_is_shorter_than_the_hint_window() {
            tracing::warn!(
                grace_s = config.tombstone_grace.as_secs(),
                hint_ttl_s = config.hint_ttl.as_secs(),
                "--tombstone-grace-s is shorter than the hint window: a hint older than a collected tombstone could bring a deleted value back"
            );
        }
        let prober = tokio::spawn(probe_loop(inner.clone(), shutdown_rx.clone()));
        // Hints already held are delivered even with --no-hints: that flag
        // only stops new ones being stored.
        let detector = inner.detector.clone();
        let membership = inner.membership.clone();
        let rings = inner.ring_tx.subscribe();
        let routing = HintRouting::to_owners(Arc::new(move |n: &NodeId| detector.is_up(n)))
            .rerouting_removed(
                inner.id.clone(),
                Arc::new(move |n: &NodeId| membership.is_removed(n)),
                Arc::new(move |key: &[u8]| match &*rings.borrow() {
                    Some(ring) => ring.replicas_of(key),
                    None => Vec::new(),
                }),
            )
            .with_ring_members({
                let rings = inner.ring_tx.subscribe();
                Arc::new(move |n: &NodeId| rings.borrow().as_ref().is_some_and(|r| r.has_node(n)))
            })
            .with_ring_fingerprint({
                let rings = inner.ring_tx.subscribe();
                Arc::new(move || rings.borrow().as_ref().map_or(0, |r| r.fingerprint()))
            });
        let handoff = handoff::start(
            hints,
            inner.transport.clone(),
            routing,
            HandoffConfig::for_ttl(config.hint_ttl),
            shutdown_rx.clone(),
        );

        // Its own signal: a removed node stops its loops but still answers
        // (status, and "removed" to everything else) until it shuts down.
        let (stop_accepting, accepting) = watch::channel(false);
        let finish_streams = Arc::new(watch::channel(false).0);
        let accept_loop = tokio::spawn(accept_loop(
            endpoint.clone(),
            inner.clone(),
            config.max_connections,
            RequestMemory::for_node(config.max_request_memory_mb << 20),
            accepting,
            finish_streams.clone(),
        ));
        let handle = NodeHandle {
            id: config.id.clone(),
            addr,
            endpoint,
            shutdown,
            stop_accepting,
            finish_streams,
            accept_loop,
            repair_worker,
            prober,
            handoff,
            background,
            inner: inner.clone(),
        };
        Ok((handle, inner))
    }
}

/// Counts a request in `NodeInner::in_flight` while it runs, however it ends.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    fn count(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Counts a served connection in the `ringkv_connections` gauge while it
/// lives, however its task ends.
struct ConnectionCounted;

impl ConnectionCounted {
    fn new() -> Self {
        metrics::gauge!("ringkv_connections").increment(1.0);
        ConnectionCounted
    }
}

impl Drop for ConnectionCounted {
    fn drop(&mut self) {
        metrics::gauge!("ringkv_connections").decrement(1.0);
    }
}

/// How long a connection may take over its handshake before it is dropped
/// and its slot given back. Without it a handshake that stalls (a client
/// that sent its first packet and nothing more) holds a slot for the whole
/// idle timeout, and a few hundred such packets a second hold them all. Two
/// round trips on the slowest link take far less.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the accept loop does with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Take a slot and run the handshake.
    Accept,
    /// Ask the client to prove it owns its address first (QUIC's stateless
    /// Retry, one round trip, no slot taken): under pressure, so that
    /// packets with forged source addresses cannot hold slots.
    Retry,
    /// Refuse at once: every slot is taken.
    Refuse,
}

/// Admission of a connection attempt when `free` of `max` slots are free.
/// Once half of them are in use, an address not yet validated
/// (`validated`: it came with a token from a Retry or an earlier
/// connection) is sent a Retry if it may be (`may_retry`).
fn admission(free: usize, max: usize, validated: bool, may_retry: bool) -> Admission {
    if free == 0 {
        Admission::Refuse
    } else if !validated && may_retry && free * 2 <= max {
        Admission::Retry
    } else {
        Admission::Accept
    }
}

/// Accepts connections and serves each, up to `max_connections` at once,
/// until `shutdown`; from then on it refuses every new one at once (so a
/// client hears it and tries another node rather than wait out its connect
/// timeout) until the endpoint closes. A handshake gets
/// [`HANDSHAKE_TIMEOUT`]; past half the slots, a client must first
/// validate its address (see [`Admission`]).
async fn accept_loop(
    endpoint: quinn::Endpoint,
    inner: Arc<NodeInner>,
    max_connections: usize,
    request_memory: Arc<RequestMemory>,
    mut shutdown: watch::Receiver<bool>,
    finish: Arc<watch::Sender<bool>>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let sources = connection_sources::ConnectionSources::new(connection_sources::per_source_max(
        max_connections,
    ));
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                let admitted = admission(
                    slots.available_permits(),
                    max_connections,
                    incoming.remote_address_validated(),
                    incoming.may_retry(),
                );
                if admitted == Admission::Retry {
                    metrics::counter!("ringkv_connections_retried_total").increment(1);
                    // Fails only if it may not retry, which was checked.
                    let _ = incoming.retry();
                    continue;
                }
                // `Refuse` means no slot was free: the slot itself decides.
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Refused at once, so the client hears it (and need not
                    // wait for a handshake timeout). Counted, and logged at
                    // debug only: a flood of them must not flood the log.
                    metrics::counter!("ringkv_connections_refused_total").increment(1);
                    tracing::debug!(remote = %incoming.remote_address(), max_connections, "connection refused: at --max-connections");
                    incoming.refuse();
                    continue;
                };
                let ip = incoming.remote_address().ip();
                let Some(source_slot) = sources.admit(ip, inner.membership.has_member_at_ip(ip)) else {
                    metrics::counter!("ringkv_connections_refused_total").increment(1);
                    tracing::debug!(remote = %incoming.remote_address(), "connection refused: its address holds its share of --max-connections");
                    incoming.refuse();
                    continue;
                };
                let (inner, finish, request_memory) = (inner.clone(), finish.clone(), request_memory.clone());
                tokio::spawn(async move {
                    let _slot = (slot, source_slot);
                    // Dropped on timeout, which closes it.
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, std::future::IntoFuture::into_future(incoming));
                    let Ok(handshake) = handshake.await else {
                        metrics::counter!("ringkv_handshakes_timed_out_total").increment(1);
                        tracing::debug!("handshake timed out");
                        return;
                    };
                    match handshake {
                        Ok(conn) => {
                            let _counted = ConnectionCounted::new();
                            // Subscribed only now: a handshake that stalls
                            // does not hold up the shutdown's wait for the
                            // streams (one ending after it is told at once).
                            let finish = finish.subscribe();
                            serve_connection(conn, move |request| inner.clone().handle(request), finish, request_memory).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "handshake failed"),
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    while let Some(incoming) = endpoint.accept().await {
        incoming.refuse();
    }
}

/// Puts the node in a cluster: the one it remembers, the one its seeds are
/// in, or a new one.
async fn form_or_join(inner: &Arc<NodeInner>, config: &NodeConfig) -> Result<(), NodeError> {
    enter_cluster(inner, config).await?;
    // Removed while it was away: a member's answer to its announce said so.
    // Nothing was installed yet, so it never served with its stale ring.
    if inner.is_removed.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(NodeError::Removed {
            id: inner.id.to_string(),
        });
    }
    inner
        .started
        .store(true, std::sync::atomic::Ordering::Release);
    inner.install();
    Ok(())
}

/// How long a start waits for the address its record last gave it to say
/// who answers there (see [`check_no_twin`]).
const TWIN_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Refuses to start when another process answers as this node at the
/// address its remembered record gives it, another than this run's: the
/// data dir was copied (a cloned machine, say). Started, the two would take
/// each other's place in every member's list in turn, each restart of one
/// passing the other's incarnation. A node that moved to a new address
/// finds nothing there, or another node, and stores its new address. (The
/// check covers a copy started while its original runs; an original
/// started after its copy has moved the cluster's entry is not caught.)
async fn check_no_twin(inner: &Arc<NodeInner>, record: &ClusterRecord) -> Result<(), NodeError> {
    let Some(previous) = inner.membership.previous_addr() else {
        return Ok(());
    };
    let Ok(addr) = previous.parse::<SocketAddr>() else {
        return inner.membership.confirm_address();
    };
    let asked = tokio::time::timeout(
        TWIN_CHECK_TIMEOUT,
        inner.transport.call_addr(addr, &Request::Identify),
    )
    .await;
    match asked {
        Ok(Ok(Response::Identity(identity)))
            if identity.node == inner.id && identity.cluster_id == Some(record.cluster_id) =>
        {
            Err(NodeError::Twin {
                id: inner.id.to_string(),
                addr: addr.to_string(),
            })
        }
        _ => inner.membership.confirm_address(),
    }
}

/// Refuses a start with none of the cluster keys (`fingerprints`) the data
/// dir's node last started with, or with no key when it had one. Its
/// peers would refuse its handshakes, but with none to ask (a one-node
/// cluster, or every peer down) it would serve, to anyone, what its key
/// kept to holders. A data dir that had no key may be given one (so a dir
/// from a release before this check, which kept no fingerprints, takes
/// its first start without a key); `--cluster-key-replaced` skips the
/// check, for a cluster whose key was lost.
fn check_cluster_key(storage: &Storage, fingerprints: Option<&[String]>) -> Result<(), NodeError> {
    let before = storage.cluster_keys()?;
    let now = fingerprints.unwrap_or_default();
    if before.is_empty() || now.iter().any(|f| before.contains(f)) {
        return Ok(());
    }
    let describe = |keys: &[String]| match keys {
        [] => "without a cluster key".to_string(),
        keys => {
            let short: Vec<&str> = keys.iter().map(|f| &f[..f.len().min(8)]).collect();
            format!(
                "with the cluster key(s) of fingerprint {}",
                short.join(", ")
            )
        }
    };
    Err(NodeError::ClusterKeyChanged {
        before: describe(&before),
        now: describe(now),
    })
}

/// Gets the node a cluster record: the remembered one (announced to every
/// member), a new one, or its seeds' (then announced to every member).
async fn enter_cluster(inner: &Arc<NodeInner>, config: &NodeConfig) -> Result<(), NodeError> {
    let membership = &inner.membership;
    if let Some(record) = membership.record() {
        check_no_twin(inner, &record).await?;
        // The members' addresses may all have changed while it was away;
        // the seeds are how an operator tells it where the cluster is now.
        // Asked alongside the members, so a start waits for neither.
        let mut seeds = tokio::task::JoinSet::new();
        for seed in unknown_seeds(inner, &record) {
            let (inner, record) = (inner.clone(), record.clone());
            seeds.spawn(
                async move { announce_to_addr(&inner, &record, seed, &seed.to_string()).await },
            );
        }
        let (asked, refusals) = announce(inner, &record).await;
        while seeds.join_next().await.is_some() {}
        // Restarted with another cluster key (or none), the node would serve
        // cut off from every peer: say so instead of starting.
        if asked > 0 && refusals.len() == asked {
            return Err(NodeError::Join {
                reason: format!(
                    "the handshake failed with every other member (a cluster key differs, or the release): {}",
                    refusals.join("; ")
                ),
            });
        }
        return Ok(());
    }
    if config.seeds.is_empty() {
        let replicas = config.replicas.unwrap_or(DEFAULT_REPLICAS);
        membership.form(rand::random(), replicas)?;
        return Ok(());
    }
    // A seed list shared by every node names each of them (as in
    // Cassandra): a node does not ask itself (`NodeInner::seeds` leaves its
    // own address out), and one whose only seed is itself would wait out
    // the join timeout doing so.
    let seeds = &inner.seeds;
    if seeds.is_empty() {
        return Err(NodeError::Config {
            reason: format!(
                "the only seed given, {}, is this node's own address; give a running member, or no seed to start a new cluster",
                config.listen
            ),
        });
    }
    let deadline = tokio::time::Instant::now() + config.join_timeout;
    let request = Request::Join(membership.join_request(config.replicas));
    let mut failures: Vec<String>;
    let mut backoff = Duration::from_millis(100);
    loop {
        failures = Vec::new();
        let mut refused = 0;
        for seed in seeds {
            // Bounded by the join timeout, which the operator gave as the
            // whole wait (a dial to a silent seed takes seconds).
            let answer =
                match tokio::time::timeout_at(deadline, inner.transport.call_addr(*seed, &request))
                    .await
                {
                    Ok(answer) => answer,
                    Err(_) => {
                        failures.push(format!("{seed}: no answer before the join timeout"));
                        break;
                    }
                };
            match answer {
                Ok(Response::Joined(reply)) => {
                    membership.adopt(reply)?;
                    if let Some(record) = membership.record() {
                        let _ = announce(inner, &record).await;
                    }
                    return Ok(());
                }
                Ok(Response::Error(e)) if e.kind == ErrorKind::Refused => {
                    return Err(NodeError::JoinRefused { reason: e.message })
                }
                Ok(Response::Error(e)) => failures.push(format!("{seed}: {}", e.message)),
                Ok(other) => failures.push(format!("{seed}: unexpected answer {other:?}")),
                Err(e) => {
                    refused += usize::from(matches!(e, CallError::Refused(_)));
                    failures.push(format!("{seed}: {e}"));
                }
            }
        }
        // Every seed refused the handshake: a key (or release) that differs
        // does not change by waiting.
        if refused == seeds.len() {
            return Err(NodeError::Join {
                reason: failures.join("; "),
            });
        }
        if tokio::time::Instant::now() + backoff > deadline {
            return Err(NodeError::Join {
                reason: format!(
                    "no seed answered within {} s: {}",
                    config.join_timeout.as_secs(),
                    failures.join("; ")
                ),
            });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Tells every other member about this node (and learns whom they know).
/// Best effort: a member that misses it learns of us from the periodic
/// membership exchange.
///
/// Returns how many members it asked and, for each that refused the TLS
/// handshake, why (see `cluster_key`).
async fn announce(inner: &Arc<NodeInner>, record: &ClusterRecord) -> (usize, Vec<String>) {
    // All at once: a start waits for the slowest member, not for the sum.
    let mut announces = tokio::task::JoinSet::new();
    for member in record.members.values() {
        if member.id != inner.id {
            let (inner, record, member) = (inner.clone(), record.clone(), member.clone());
            announces.spawn(async move { announce_to(&inner, &record, &member).await });
        }
    }
    let (mut asked, mut refusals) = (0, Vec::new());
    while let Some(refused) = announces.join_next().await {
        asked += 1;
        if let Ok(Some(reason)) = refused {
            refusals.push(reason);
        }
    }
    (asked, refusals)
}

/// How long one announcement may take.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a node exchanges its member list with one random member, so a
/// member that missed a join (unreachable at the time) still learns of it.
pub const DEFAULT_MEMBERSHIP_EXCHANGE_INTERVAL: Duration = Duration::from_secs(5);

/// The node's seeds that no member of `record` is at.
fn unknown_seeds(inner: &NodeInner, record: &ClusterRecord) -> Vec<SocketAddr> {
    inner
        .seeds
        .iter()
        .copied()
        .filter(|seed| {
            !record
                .members
                .values()
                .any(|m| m.addr.parse::<SocketAddr>().ok() == Some(*seed))
        })
        .collect()
}

/// Announces this node to `member` and adopts whatever members it knows.
/// Returns why, if `member` refused the TLS handshake.
async fn announce_to(
    inner: &Arc<NodeInner>,
    record: &ClusterRecord,
    member: &Member,
) -> Option<String> {
    let Ok(addr) = member.addr.parse::<SocketAddr>() else {
        return None;
    };
    announce_to_addr(inner, record, addr, member.id.as_str())
        .await
        .map(|e| format!("{} ({}): {e}", member.id, member.addr))
}

/// Announces this node to whoever serves at `addr` (named `peer` in logs)
/// and adopts whatever members it knows; a node of another cluster refuses
/// (the cluster id is in the request). Returns why, if it refused the TLS
/// handshake.
async fn announce_to_addr(
    inner: &Arc<NodeInner>,
    record: &ClusterRecord,
    addr: SocketAddr,
    peer: &str,
) -> Option<String> {
    let request = Request::Join(JoinRequest {
        member: inner.membership.me(),
        replicas: Some(record.replicas as u32),
        cluster_id: Some(record.cluster_id),
    });
    let mut refused = None;
    // Before asking: the answer knows at least what the peer knew then.
    let asked_unix_ms = unix_ms();
    let exchanged = || {
        // After the merge (and the install, once started): a ring hand-over
        // that sees this time checks it has taken in what it brought.
        inner
            .exchanged_unix_ms
            .fetch_max(asked_unix_ms, std::sync::atomic::Ordering::Release);
    };
    let outcome = match tokio::time::timeout(
        ANNOUNCE_TIMEOUT,
        inner.transport.call_addr(addr, &request),
    )
    .await
    {
        Ok(Ok(Response::Joined(reply))) => match inner.membership.adopt(reply) {
            Ok(true) => {
                tracing::info!(peer = %peer, "learned new members");
                inner.install_if_started();
                exchanged();
                "learned"
            }
            Ok(false) => {
                exchanged();
                "same"
            }
            Err(e @ NodeError::Removed { .. }) => {
                tracing::error!(peer = %peer, error = %e, "this node was removed from the cluster");
                inner.on_removed();
                "removed"
            }
            Err(e) => {
                tracing::warn!(peer = %peer, error = %e, "announce refused");
                "refused"
            }
        },
        Ok(Ok(Response::Error(e))) => {
            tracing::warn!(peer = %peer, error = %e.message, "announce refused");
            "refused"
        }
        Ok(Ok(_)) => "same",
        Ok(Err(e @ CallError::Refused(_))) => {
            // Not a peer that is down: one of the two holds another key.
            tracing::warn!(peer = %peer, error = %e, "the handshake with the peer failed (one of the two refused the other's certificate: a cluster key differs, or the release)");
            refused = Some(e.to_string());
            "handshake_refused"
        }
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "announce failed; peer down?");
            "failed"
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "announce timed out");
            "failed"
        }
    };
    metrics::counter!("ringkv_membership_announces_total", "outcome" => outcome).increment(1);
    refused
}

/// One round of the membership exchange: announce to one random member
/// believed up, or, while none is, to one random seed no member is at.
async fn exchange_membership(inner: &Arc<NodeInner>) {
    let Some(record) = inner.membership.record() else {
        return;
    };
    let peers: Vec<&Member> = record
        .members
        .values()
        .filter(|m| m.id != inner.id && inner.detector.is_up(&m.id))
        .collect();
    if peers.is_empty() {
        let seeds = unknown_seeds(inner, &record);
        if !seeds.is_empty() {
            let seed = seeds[rand::random::<usize>() % seeds.len()];
            let _ = announce_to_addr(inner, &record, seed, &seed.to_string()).await;
        }
        return;
    }
    let pick = peers[rand::random::<usize>() % peers.len()];
    let _ = announce_to(inner, &record, pick).await;
}

#[cfg(test)]
mod tests {
    /// The warning about the grace and the hint window stands with
    /// `--no-hints` too, which stops new hints but not the delivery of those
    /// held.
    #[test]
    fn a_grace_shorter_than_the_hint_window_is_flagged_with_or_without_hints() {
        let mut config = super::NodeConfig::on_loopback(
            ringkv_core::NodeId::new("n1").unwrap(),
            std::path::PathBuf::from("/nonexistent"),
        );
        assert!(!config.grace_is_shorter_than_the_hint_window(), "defaults");
        config.tombstone_grace = config.hint_ttl / 2;
        assert!(config.grace_is_shorter_than_the_hint_window());
        config.hints = false;
        assert!(config.grace_is_shorter_than_the_hint_window());
    }

    /// Slots are taken while any are free; once half of them are in use an
    /// unvalidated address is sent a Retry, and none are taken when none
    /// are free.
    #[test]
    fn past_half_the_slots_a_client_validates_its_address_first() {
        use super::{admission, Admission::*};
        assert_eq!(admission(4096, 4096, false, true), Accept);
        assert_eq!(admission(2049, 4096, false, true), Accept);
        assert_eq!(admission(2048, 4096, false, true), Retry);
        assert_eq!(admission(2048, 4096, true, true), Accept, "validated");
        assert_eq!(admission(1, 4096, true, false), Accept, "retried once");
        assert_eq!(admission(0, 4096, true, false), Refuse);
        // One slot in all: the only client is never made to retry.
        assert_eq!(admission(1, 1, false, true), Accept);
    }

    use super::*;
    use crate::storage::wal_bytes;
    use crate::test_support::wait_until;
    use ringkv_coordinator::replica::Store;
    use ringkv_core::dvv::{Clock, Payload, VersionVector};
    use ringkv_core::wire::PutRequest;
    use ringkv_core::Consistency;

    fn clock(value: &str, actor: &str) -> Clock {
        let mut clock = Clock::new();
        clock.update(
            &VersionVector::new(),
            Payload::Value(value.as_bytes().to_vec()),
            &NodeId::new(actor).unwrap(),
        );
        clock
    }

    /// Whatever the request, its answer comes after the flush of every
    /// write buffered before it: its own, and the ones a read may have seen.
    #[tokio::test(flavor = "current_thread")]
    async fn every_replica_answer_waits_for_buffered_writes_to_be_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        let local = LocalReplica {
            replica: Arc::new(ReplicaService::new(
                NodeId::new("n1").unwrap(),
                storage.clone(),
                8,
            )),
        };
        let requests = [
            ReplicaRequest::Read {
                key: b"seen".to_vec(),
                hint_for: None,
            },
            ReplicaRequest::Sync {
                key: b"synced".to_vec(),
                clock: clock("s", "n2"),
            },
            ReplicaRequest::Update {
                key: b"updated".to_vec(),
                context: VersionVector::new(),
                payload: Payload::Value(b"u".to_vec()),
                overwrite: false,
                hint_for: None,
            },
        ];
        for request in requests {
            // A write another request made, still in the WAL buffer.
            Store::put(&*storage, b"seen", None, &clock("v", "n3")).unwrap();
            assert_eq!(storage.pending_writes(), 1);
            let kind = format!("{request:?}");
            let answer = local.handle(request).await;
            assert!(matches!(answer, Response::Clock(_)), "{kind}: {answer:?}");
            assert_eq!(
                storage.pending_writes(),
                0,
                "answered {kind} before the flush"
            );
        }
    }

    /// A leave hands over each key as the node holds it when the key's
    /// page goes out, not as its scan saw it: a first pass over a large
    /// store can outlast the tombstone grace, and a copy removed since (a
    /// collected tombstone; here removed by hand once the scan has read
    /// it) must not reach the replicas that take over.
    #[tokio::test]
    async fn a_leave_hands_over_what_it_holds_now_not_what_its_scan_saw() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let (n1, n2, n3, key) = three_with_a_key_on_n3(&dirs).await;
        let replica = n3.inner.local.replica.clone();
        let (seen, removed) = (key.clone(), replica.clone());
        *n3.inner.leave_page_read.lock().unwrap() = Some(Box::new(move |keys: &[Vec<u8>]| {
            if keys.contains(&seen) {
                if let Ok(Some(held)) = removed.read(&seen) {
                    assert!(removed.remove_if_unchanged(&seen, &held).unwrap());
                }
            }
        }));
        let left = n3.inner.leave().await;
        assert!(matches!(left, Response::Left(_)), "{left:?}");
        for n in [&n1, &n2] {
            assert_eq!(
                n.inner.local.replica.read(&key).unwrap(),
                None,
                "{}",
                n.inner.id
            );
        }
        for n in [n3, n2, n1] {
            n.shutdown().await;
        }
    }

    /// A join that moves a key from a member that stays is noted for
    /// tombstone collection: on n1, the tombstone of a key n3's join took
    /// from n2 stays, though n3 (its other replica now) holds nothing,
    /// since n2 may still hand over a copy that missed the delete. Once the
    /// change is a window old, the tombstone goes.
    #[tokio::test]
    async fn a_tombstone_stays_while_a_member_that_lost_its_key_may_hand_it_over() {
        use super::recent_rings::RecentRings;
        use super::tombstone_gc::collect_if_held_everywhere;

        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let (n1, n2, n3, _) = three_with_a_key_on_n3(&dirs).await;
        let three = n1.inner.ring_tx.borrow().clone().unwrap();
        let two = Arc::new(
            Ring::new(
                three
                    .members()
                    .iter()
                    .filter(|(id, _)| *id != n3.inner.id)
                    .map(|(id, vnodes)| (id.clone(), *vnodes)),
                three.replicas(),
            )
            .unwrap(),
        );
        let key = (0..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| {
                let replicas = three.replicas_of(k);
                replicas.contains(&n1.inner.id) && replicas.contains(&n3.inner.id)
            })
            .unwrap();
        crate::test_support::wait_until("n1 noted that n3's join moved keys", || {
            let recent = n1.inner.recent_rings();
            recent
                .as_ref()
                .is_some_and(|r| r.moved_lately(&key, &three, crate::storage::unix_ms()))
        })
        .await;
        let replica = n1.inner.local.replica.clone();
        replica
            .update(&key, &VersionVector::new(), Payload::Tombstone)
            .unwrap();
        collect_if_held_everywhere(&n1.inner, &three, key.clone(), u64::MAX).await;
        assert!(
            replica.read(&key).unwrap().is_some(),
            "kept: n2 may hand a copy over"
        );

        // The same change, a whole window ago.
        let grace = Duration::from_secs(86_400);
        let long_ago = crate::storage::unix_ms() - crate::storage::millis(grace);
        let mut recent = RecentRings::new(grace);
        recent.note_ring(None, &two, long_ago - 1);
        recent.note_ring(Some(&two), &three, long_ago);
        *n1.inner.recent_rings() = Some(recent);
        collect_if_held_everywhere(&n1.inner, &three, key.clone(), u64::MAX).await;
        assert!(
            replica.read(&key).unwrap().is_none(),
            "collected after the window"
        );
        drop(replica);
        for n in [n3, n2, n1] {
            n.shutdown().await;
        }
    }

    /// A member refuses replica requests from a node it removed that has
    /// not heard of it (one cut off when it was removed, say): that node's
    /// copies may be older than tombstones collected since, and its pushes
    /// would bring deleted values back; so is a leave's first pass, should
    /// it be asked to leave. A leave's last pass, made after the members
    /// removed the node, is taken. The refusal has the node ask the
    /// refusing member for the record at once (not at its next exchange,
    /// an hour away here), and it learns it was removed.
    #[tokio::test]
    async fn a_member_refuses_replica_requests_from_a_node_it_removed() {
        use std::sync::atomic::Ordering::SeqCst;
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let (n1, n2, n3) = three_settled(&dirs, |config| {
            config.membership_exchange_interval = Duration::from_secs(3600);
        })
        .await;
        let ring = n3.inner.ring_tx.borrow().clone().unwrap();
        // n1 and n2 remove n3, which is not told.
        for n in [&n1, &n2] {
            let removal = Request::Remove {
                node: n3.inner.id.clone(),
                tell_others: false,
            };
            let answer = n.inner.clone().handle(removal).await;
            assert!(matches!(answer, Response::Removed(_)), "{answer:?}");
        }
        // Asked to leave, unaware, it cannot push its copies either: the
        // members refuse its first pass (the leave's removal, which they
        // would confirm, comes after it). The refusal has it learn of its
        // removal: the leave says so.
        let zombie = (0..)
            .map(|i| format!("zombie{i}").into_bytes())
            .find(|k| ring.replicas_of(k).contains(&n3.inner.id))
            .unwrap();
        let old = Payload::Value(b"old".to_vec());
        let replica = &n3.inner.local.replica;
        replica.update(&zombie, &VersionVector::new(), old).unwrap();
        let left = n3.inner.leave().await;
        assert!(
            matches!(&left, Response::Error(e) if e.kind == ErrorKind::Unavailable),
            "{left:?}"
        );
        for n in [&n1, &n2] {
            assert!(n.inner.local.replica.read(&zombie).unwrap().is_none());
        }
        let sync = |key: &[u8]| {
            let mut clock = Clock::new();
            clock.update(
                &VersionVector::new(),
                Payload::Value(b"old".to_vec()),
                &n3.inner.id,
            );
            Request::Replica(ReplicaRequest::Sync {
                key: key.to_vec(),
                clock,
            })
        };
        let last_pass = &n3.inner.transport.leave_last_pass;
        last_pass.store(true, SeqCst);
        let leaving = n3.inner.transport.call(&n2.inner.id, sync(b"left")).await;
        assert!(matches!(leaving, Ok(Response::Clock(None))), "{leaving:?}");
        assert!(n2.inner.local.replica.read(b"left").unwrap().is_some());
        last_pass.store(false, SeqCst);

        let pushed = n3.inner.transport.call(&n1.inner.id, sync(b"stale")).await;
        assert!(
            matches!(&pushed, Ok(Response::Error(e)) if e.kind == ErrorKind::SenderRemoved),
            "{pushed:?}"
        );
        assert!(
            n1.inner.local.replica.read(b"stale").unwrap().is_none(),
            "nothing merged"
        );
        wait_until("n3 learned it was removed", || {
            n3.inner.is_removed.load(SeqCst)
        })
        .await;
        for n in [n3, n2, n1] {
            n.shutdown().await;
        }
    }

    /// A leave asked before the node's ring hand-over has taken in its
    /// newest ring (a restart that has not installed the ring a join
    /// changed, say) is refused: the keys that join took from it would not
    /// be owed yet, and would be left behind. Once taken in, it goes.
    #[tokio::test]
    async fn a_leave_waits_until_the_hand_over_has_taken_in_the_ring() {
        use super::recent_rings::RecentRings;

        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let (n1, n2, n3, _) = three_with_a_key_on_n3(&dirs).await;
        let grace = Duration::from_secs(86_400);
        let noted = n3.inner.recent_rings().take();
        *n3.inner.recent_rings() = Some(RecentRings::new(grace));
        let refused = n3.inner.leave().await;
        assert!(
            matches!(&refused, Response::Error(e) if e.message.contains("not yet taken in")),
            "{refused:?}"
        );
        *n3.inner.recent_rings() = noted;
        let left = n3.inner.leave().await;
        assert!(matches!(left, Response::Left(_)), "{left:?}");
        for n in [n3, n2, n1] {
            n.shutdown().await;
        }
    }

    /// A shutdown while a leave's last pass retries replicas that are down
    /// ends that pass once the drain is over: the node lets go of its
    /// database as shutdown returns, not a minute later, and the leave says
    /// what its last pass did not do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_ends_a_leave_s_failing_last_pass() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let (n1, n2, n3, _) = three_with_a_key_on_n3(&dirs).await;
        // The last pass's first page (the hook's second call) waits until
        // the other members are down, so that every try of the pass fails.
        let (reached, pages) = (Arc::new(AtomicBool::new(false)), AtomicUsize::new(0));
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let hook_reached = reached.clone();
        *n3.inner.leave_page_read.lock().unwrap() = Some(Box::new(move |_: &[Vec<u8>]| {
            if pages.fetch_add(1, SeqCst) == 1 {
                hook_reached.store(true, SeqCst);
                let _ = wait.recv();
            }
        }));
        let leaving = tokio::spawn({
            let inner = n3.inner.clone();
            async move { inner.leave().await }
        });
        wait_until("the last pass began", || reached.load(SeqCst)).await;
        n1.shutdown().await;
        n2.shutdown().await;
        go.send(()).unwrap();
        n3.shutdown().await;
        let left = tokio::time::timeout(Duration::from_secs(5), leaving)
            .await
            .expect("the leave still ran after shutdown returned")
            .unwrap();
        let Response::Left(reply) = left else {
            panic!("{left:?}");
        };
        assert!(
            reply.late_failures.iter().any(|f| f
                .reason
                .contains("shut down before its last hand-over finished")),
            "{reply:?}"
        );
        // The database is closed: its lock is free.
        crate::storage::Storage::open(dirs[2].path(), false).unwrap();
    }

    /// An emulated call whose peer never answers ends its task once its
    /// caller has given up and `OVER_LINK_AFTER_CALLER` has passed, instead
    /// of keeping it (and the request) until the connection dies.
    #[tokio::test(start_paused = true)]
    async fn an_emulated_call_nobody_answers_does_not_outlive_its_caller_for_long() {
        let matrix = LatencyMatrix::parse_toml(
            "regions = [\"a\", \"b\"]\n[[link]]\nbetween = [\"a\", \"b\"]\ndelay_ms = 0\n",
        )
        .unwrap();
        let links = Arc::new(RegionLinks::new(Arc::new(matrix), "a".into()).unwrap());
        let held = Arc::new(());
        let request = held.clone();
        let call = async move {
            let _request = request;
            std::future::pending::<Result<Response, CallError>>().await
        };
        let gave_up = tokio::time::timeout(
            Duration::from_millis(100),
            over_link(links, "b".into(), call),
        )
        .await;
        assert!(gave_up.is_err());
        tokio::time::sleep(OVER_LINK_AFTER_CALLER - Duration::from_secs(1)).await;
        assert_eq!(Arc::strong_count(&held), 2, "still waiting, for a while");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(Arc::strong_count(&held), 1, "the task ended");
    }

    /// Three settled nodes ([`three_settled`]) and a key n3 replicates,
    /// written with value "v" on n3 only.
    async fn three_with_a_key_on_n3(
        dirs: &[tempfile::TempDir],
    ) -> (NodeHandle, NodeHandle, NodeHandle, Vec<u8>) {
        let (n1, n2, n3) = three_settled(dirs, |_| {}).await;
        let ring = n3.inner.ring_tx.borrow().clone().unwrap();
        let key = (0..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| ring.replicas_of(k).contains(&n3.inner.id))
            .unwrap();
        n3.inner
            .local
            .replica
            .update(&key, &VersionVector::new(), Payload::Value(b"v".to_vec()))
            .unwrap();
        (n1, n2, n3, key)
    }

    /// Three nodes of a two-replica cluster in `dirs` (n3 with its config
    /// changed by `adjust_n3`), once each has the ring of three, n3's
    /// hand-over has read what it owes, and every node noted the ring.
    async fn three_settled(
        dirs: &[tempfile::TempDir],
        adjust_n3: impl FnOnce(&mut NodeConfig),
    ) -> (NodeHandle, NodeHandle, NodeHandle) {
        let n1 = start_in_pair("n1", dirs[0].path(), None).await;
        let n2 = start_in_pair("n2", dirs[1].path(), Some(n1.addr())).await;
        let mut config = pair_config("n3", dirs[2].path(), Some(n1.addr()));
        adjust_n3(&mut config);
        let n3 = Node::start(config).await.unwrap();
        let three = |n: &NodeHandle| {
            n.inner
                .ring_tx
                .borrow()
                .as_ref()
                .is_some_and(|r| r.len() == 3)
        };
        wait_until("every node has the ring of three", || {
            three(&n1) && three(&n2) && three(&n3)
        })
        .await;
        wait_until("n3's hand-over has read what it owes", || {
            !n3.inner
                .handover_owed
                .load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
        let ring = n3.inner.ring_tx.borrow().clone().unwrap();
        for n in [&n1, &n2, &n3] {
            super::tombstone_gc::tests::wait_for_recent_rings(&n.inner, &ring).await;
        }
        (n1, n2, n3)
    }

    /// The config of a node `id` of a two-replica cluster in `dir`, on a
    /// free loopback port, joining through `seed` if given.
    fn pair_config(id: &str, dir: &std::path::Path, seed: Option<SocketAddr>) -> NodeConfig {
        let mut config = NodeConfig::on_loopback(NodeId::new(id).unwrap(), dir.into());
        config.replicas = Some(2);
        config.seeds = seed.into_iter().collect();
        config
    }

    /// A node `id` of a two-replica cluster in `dir`, on a free loopback
    /// port, joining through `seed` if given.
    async fn start_in_pair(
        id: &str,
        dir: &std::path::Path,
        seed: Option<SocketAddr>,
    ) -> NodeHandle {
        Node::start(pair_config(id, dir, seed)).await.unwrap()
    }

    /// Whether `node`'s trees are ready for its current ring of two nodes.
    fn trees_follow_pair(node: &NodeHandle) -> bool {
        let ring = node.inner.ring_tx.borrow().clone().unwrap();
        ring.len() == 2 && node.inner.anti_entropy.trees().is_current_for(&ring)
    }

    /// The failure detector's probe allows an emulated matrix's longest
    /// round trip; without a matrix it keeps its default.
    #[test]
    fn the_probe_timeout_allows_the_matrix_s_longest_round_trip() {
        let default = DetectorConfig::default().probe_timeout;
        assert_eq!(detector_config(None).probe_timeout, default);
        let matrix = LatencyMatrix::parse_toml(
            "regions = [\"a\", \"b\"]\n[[link]]\nbetween = [\"a\", \"b\"]\ndelay_ms = 300\n",
        )
        .unwrap();
        assert_eq!(
            detector_config(Some(&matrix)).probe_timeout,
            default + Duration::from_millis(600)
        );
    }

    /// A member that comes back at another address changes the cluster
    /// record but not where keys go: the other nodes keep their trees, in
    /// service, instead of rebuilding them.
    #[tokio::test]
    async fn a_member_at_a_new_address_costs_no_tree_rebuild() {
        use std::sync::atomic::Ordering::SeqCst;
        let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let n1 = start_in_pair("n1", dir1.path(), None).await;
        let n2 = start_in_pair("n2", dir2.path(), Some(n1.addr())).await;
        wait_until("no trees for n1 and n2", || trees_follow_pair(&n1)).await;
        let old_addr = n2.addr();
        n2.shutdown().await;
        let (rebuilds, considered) = (
            n1.inner.rebuilds_decided.load(SeqCst),
            n1.inner.rings_considered.load(SeqCst),
        );
        // Port 0: n2 comes back at another port, and tells n1.
        let n2 = start_in_pair("n2", dir2.path(), None).await;
        assert_ne!(n2.addr(), old_addr);
        wait_until("n1 never installed n2's new address", || {
            n1.inner.rings_considered.load(SeqCst) != considered
        })
        .await;
        assert_eq!(n1.inner.rebuilds_decided.load(SeqCst), rebuilds);
        assert!(trees_follow_pair(&n1), "the trees stayed in service");
        n2.shutdown().await;
        n1.shutdown().await;
    }

    /// A failed tree rebuild is tried again after a wait, without waiting
    /// for another ring change, until one succeeds.
    #[tokio::test]
    async fn a_failed_tree_rebuild_is_retried_until_it_succeeds() {
        use std::sync::atomic::Ordering::SeqCst;
        let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let n1 = start_in_pair("n1", dir1.path(), None).await;
        let trees = n1.inner.anti_entropy.trees().clone();
        wait_until("no first rebuild", || trees.is_ready()).await;
        // The rebuild for the ring with n2 fails twice before one succeeds.
        n1.inner.storage.failing_rebuilds.store(2, SeqCst);
        let n2 = start_in_pair("n2", dir2.path(), Some(n1.addr())).await;
        wait_until("the trees never recovered", || trees_follow_pair(&n1)).await;
        assert_eq!(n1.inner.storage.failing_rebuilds.load(SeqCst), 0);
        n2.shutdown().await;
        n1.shutdown().await;
    }

    /// End to end, through a client and the coordinator's call to itself:
    /// an acknowledged put is in the log file.
    #[tokio::test]
    async fn an_acknowledged_put_is_in_the_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
        assert!(!config.sync, "the test is about the default, buffered WAL");
        let node = Node::start(config).await.unwrap();
        let client = crate::Client::connect(node.addr(), Duration::from_secs(5))
            .await
            .unwrap();
        let before = wal_bytes(dir.path());
        let value = vec![b'v'; 8192];
        let put = PutRequest::new(b"k".to_vec(), Payload::Value(value), Consistency::One, None);
        assert!(matches!(
            client.call(&Request::Put(put)).await.unwrap(),
            Response::Put(_)
        ));
        // Read before shutdown, which flushes anyway.
        let after = wal_bytes(dir.path());
        assert!(
            after >= before + 8192,
            "acknowledged, yet the log file grew by only {} bytes",
            after - before
        );
        node.shutdown().await;
        client.close().await;
    }
}
