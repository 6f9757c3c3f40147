//! A simulated network for deterministic scenario tests.
//!
//! [`SimNetwork`] delivers [`Request`]s between in-process nodes and can crash
//! nodes, partition pairs of nodes, delay links and drop messages. Drops come
//! from a seeded generator and delays from tokio's clock, so a test run under
//! `tokio::time::pause` replays exactly. A lost message is not an error the
//! sender sees: like a dead QUIC peer, it simply never answers, and the
//! coordinator's deadline decides. Every send is written to a log that tests
//! can read as the story of the scenario (`n1 -> n3 Sync (dropped: n3 is down)`).
//!
//! [`SimCluster`] puts N coordinators with in-memory replicas on such a
//! network.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringkv_core::consistency::Consistency;
use ringkv_core::dvv::Payload;
use ringkv_core::wire::{
    ErrorKind, GetRequest, NodeStats, PutRequest, ReplicaRequest, Request, Response,
};
use ringkv_core::{NodeId, Transport, TransportError};
use ringkv_ring::Ring;

use crate::coordinator::{Coordinator, CoordinatorConfig};
use crate::failure::{probe_round, DetectorConfig, FailureDetector};
use crate::replica::{MemStore, ReplicaService};
use ringkv_repair::anti_entropy::{AntiEntropy, AntiEntropyConfig};
use ringkv_repair::handoff::{self, HandoffConfig, HintRouting};
use ringkv_repair::hints::{HintBook, HintConfig, HintError, MemHintBackend, WallClock};
use ringkv_repair::read_repair::{ReadRepairQueue, DEFAULT_QUEUE_CAPACITY};
use ringkv_repair::trees::ReplicaTrees;

/// What a simulated node does with a request.
pub trait SimHandler: Send + Sync + 'static {
    fn handle(
        &self,
        request: Request,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + '_>>;
}

#[derive(Default)]
struct SimState {
    handlers: HashMap<NodeId, Arc<dyn SimHandler>>,
    down: HashSet<NodeId>,
    /// Nodes that calls *to* fail at once, as a real transport's do once a
    /// dial to them has failed, rather than go unanswered. (They still send
    /// and coordinate themselves.)
    refusing: HashSet<NodeId>,
    /// Nodes that answer every call with this error, running nothing
    /// (`Overloaded`: as a node whose request memory is full does).
    failing: HashMap<NodeId, ErrorKind>,
    /// Nodes whose leaf listings of more than this many leaves fail as a
    /// real node's do when the answer passes the frame limit.
    leaf_listing_max: HashMap<NodeId, usize>,
    /// Per node, a leaf whose listing it fails (`Internal`), as a node
    /// whose index is damaged there does; `None`: every leaf.
    failing_leaf: HashMap<NodeId, Option<u32>>,
    /// Leaf listings refused so by any node.
    leaf_listings_refused: u64,
    partitions: HashSet<(NodeId, NodeId)>,
    /// One-way delay per directed link.
    delays: HashMap<(NodeId, NodeId), Duration>,
    /// Bytes per second of a link one way (unset: no limit); a message
    /// takes its encoded size at that rate on top of the delay.
    bandwidths: HashMap<(NodeId, NodeId), u64>,
    drop_per_million: u32,
    rng: u64,
    log: Vec<String>,
}

/// The network. Cheap to clone; clones share state.
#[derive(Clone, Default)]
pub struct SimNetwork {
    state: Arc<Mutex<SimState>>,
}

impl SimNetwork {
    /// A network whose random drops follow `seed`.
    pub fn new(seed: u64) -> Self {
        let net = SimNetwork::default();
        net.with(|s| s.rng = seed | 1);
        net
    }

    fn with<R>(&self, f: impl FnOnce(&mut SimState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn register(&self, node: NodeId, handler: Arc<dyn SimHandler>) {
        self.with(|s| s.handlers.insert(node, handler));
    }

    /// The transport `node` sends through.
    pub fn transport(&self, node: NodeId) -> SimTransport {
        SimTransport {
            from: node,
            net: self.clone(),
        }
    }

    /// Makes calls *to* `node` fail at once (a transport error), where
    /// [`Self::down`] leaves them unanswered, until [`up`](Self::up).
    pub fn refuse(&self, node: &NodeId) {
        self.with(|s| s.refusing.insert(node.clone()));
    }

    /// Makes `node` answer every call `Overloaded`, running nothing, as a
    /// node whose request memory is full does, until [`up`](Self::up).
    pub fn overload(&self, node: &NodeId) {
        self.fail_with(node, ErrorKind::Overloaded);
    }

    /// Makes `node` answer every call with an error of `kind` at once,
    /// running nothing (a node whose storage fails answers `Internal`),
    /// until [`up`](Self::up).
    pub fn fail_with(&self, node: &NodeId, kind: ErrorKind) {
        self.with(|s| s.failing.insert(node.clone(), kind));
    }

    /// Makes `node` answer a leaf listing (`LeafItems`) of more than
    /// `leaves` leaves `Unavailable`, as a node holding more keys there than
    /// one answer may carry does.
    pub fn limit_leaf_listings(&self, node: &NodeId, leaves: usize) {
        self.with(|s| s.leaf_listing_max.insert(node.clone(), leaves));
    }

    /// Makes `node` answer `Internal` to every leaf listing that includes
    /// `key`'s leaf, as a node whose index is damaged there does.
    pub fn fail_leaf_listing_of(&self, node: &NodeId, key: &[u8]) {
        let leaf = ringkv_repair::merkle::leaf_of(key, SIM_LEAF_BITS) as u32;
        self.with(|s| s.failing_leaf.insert(node.clone(), Some(leaf)));
    }

    /// Makes `node` answer `Internal` to every leaf listing, as a node
    /// whose index cannot be read does.
    pub fn fail_leaf_listings(&self, node: &NodeId) {
        self.with(|s| s.failing_leaf.insert(node.clone(), None));
    }

    /// Leaf listings refused under [`Self::limit_leaf_listings`] so far.
    pub fn leaf_listings_refused(&self) -> u64 {
        self.with(|s| s.leaf_listings_refused)
    }

    /// Crashes `node`: it neither receives nor answers until [`up`](Self::up).
    pub fn down(&self, node: &NodeId) {
        self.with(|s| s.down.insert(node.clone()));
    }

    pub fn up(&self, node: &NodeId) {
        self.with(|s| {
            s.down.remove(node);
            s.refusing.remove(node);
            s.failing.remove(node);
        });
    }

    /// Cuts the link between `a` and `b` both ways.
    pub fn partition(&self, a: &NodeId, b: &NodeId) {
        self.with(|s| s.partitions.insert(ordered(a, b)));
    }

    pub fn heal(&self) {
        self.with(|s| s.partitions.clear());
    }

    /// Sets the one-way delay from `from` to `to`.
    pub fn delay(&self, from: &NodeId, to: &NodeId, delay: Duration) {
        self.with(|s| s.delays.insert((from.clone(), to.clone()), delay));
    }

    /// Gives the link from `from` to `to` a bandwidth of `bytes_per_s`:
    /// each message then also takes its encoded size at that rate
    /// (messages in flight together do not share it).
    pub fn bandwidth(&self, from: &NodeId, to: &NodeId, bytes_per_s: u64) {
        self.with(|s| {
            s.bandwidths
                .insert((from.clone(), to.clone()), bytes_per_s.max(1))
        });
    }

    /// How long `bytes` (computed only if the link has a limit) take to
    /// cross from `from` to `to` beyond its delay.
    fn transfer(&self, from: &NodeId, to: &NodeId, bytes: impl FnOnce() -> usize) -> Duration {
        match self.with(|s| s.bandwidths.get(&(from.clone(), to.clone())).copied()) {
            Some(rate) => Duration::from_secs_f64(bytes() as f64 / rate as f64),
            None => Duration::ZERO,
        }
    }

    /// Drops each message with this probability, drawn from the seed.
    pub fn drop_rate(&self, probability: f64) {
        self.with(|s| s.drop_per_million = (probability.clamp(0.0, 1.0) * 1e6) as u32);
    }

    /// The log of sends so far, and clears it.
    pub fn take_log(&self) -> Vec<String> {
        self.with(|s| std::mem::take(&mut s.log))
    }

    /// Decides the fate of a message; `Err` holds why it is lost.
    fn route(&self, from: &NodeId, to: &NodeId, what: &str) -> Result<Duration, ()> {
        self.with(|s| {
            let lost = if s.down.contains(to) {
                Some(format!("{to} is down"))
            } else if s.down.contains(from) {
                Some(format!("{from} is down"))
            } else if s.partitions.contains(&ordered(from, to)) {
                Some("partitioned".to_string())
            } else if from != to
                && s.drop_per_million > 0
                && next_random(&mut s.rng) % 1_000_000 < u64::from(s.drop_per_million)
            {
                Some("random drop".to_string())
            } else {
                None
            };
            match lost {
                Some(why) => {
                    s.log
                        .push(format!("{from} -> {to} {what} (dropped: {why})"));
                    Err(())
                }
                None => {
                    if from != to {
                        s.log.push(format!("{from} -> {to} {what}"));
                    }
                    Ok(s.delays
                        .get(&(from.clone(), to.clone()))
                        .copied()
                        .unwrap_or_default())
                }
            }
        })
    }
}

fn ordered(a: &NodeId, b: &NodeId) -> (NodeId, NodeId) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

/// xorshift64*: tiny, seeded, and the same on every platform.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn label(request: &Request) -> String {
    match request {
        Request::Put(_) => "Put".into(),
        Request::Get(_) => "Get".into(),
        Request::Status => "Status".into(),
        Request::Stats => "Stats".into(),
        Request::Join(_) => "Join".into(),
        Request::Ping => "Ping".into(),
        Request::Identify => "Identify".into(),
        Request::Replica(replica) => replica_label(replica),
        Request::Repair => "Repair".into(),
        Request::Remove { node, .. } => format!("Remove {node}"),
        Request::Leave => "Leave".into(),
        Request::Cleanup => "Cleanup".into(),
        // Only real nodes wrap their replica requests.
        Request::ReplicaFrom { from, request, .. } => {
            format!("{} from {from}", replica_label(request))
        }
    }
}

fn replica_label(request: &ReplicaRequest) -> String {
    match request {
        ReplicaRequest::Update { .. } => "Update".into(),
        ReplicaRequest::Sync { .. } => "Sync".into(),
        ReplicaRequest::Handoff { .. } => "Handoff".into(),
        ReplicaRequest::Read { hint_for: None, .. } => "Read".into(),
        ReplicaRequest::Read {
            hint_for: Some(owner),
            ..
        } => format!("Read for {owner}"),
        ReplicaRequest::Hint { owner, .. } => format!("Hint for {owner}"),
        ReplicaRequest::TreeHashes { level, .. } => {
            format!("TreeHashes level {level}")
        }
        ReplicaRequest::LeafItems { .. } => "LeafItems".into(),
        ReplicaRequest::ReadBatch { .. } => "ReadBatch".into(),
        ReplicaRequest::SyncBatch { .. } => "SyncBatch".into(),
    }
}

/// One node's view of the [`SimNetwork`].
#[derive(Clone)]
pub struct SimTransport {
    from: NodeId,
    net: SimNetwork,
}

impl Transport for SimTransport {
    async fn call(&self, to: &NodeId, request: Request) -> Result<Response, TransportError> {
        let what = label(&request);
        // A node serves its own calls directly, as a real one does: they
        // are neither refused at a handshake nor dropped on the way. (A
        // node made to fail, `fail_with`, fails its own calls too.)
        if *to != self.from && self.net.with(|s| s.refusing.contains(to)) {
            self.net.with(|s| {
                s.log
                    .push(format!("{} -> {to} {what} (refused)", self.from))
            });
            return Err(TransportError::Unreachable {
                node: to.clone(),
                reason: "refused".to_string(),
            });
        }
        let Ok(delay) = self.net.route(&self.from, to, &what) else {
            return std::future::pending().await;
        };
        let delay = delay
            + self.net.transfer(&self.from, to, || {
                ringkv_core::wire::encode_request(&request).len()
            });
        let handler = self
            .net
            .with(|s| s.handlers.get(to).cloned())
            .ok_or_else(|| TransportError::UnknownNode { node: to.clone() })?;
        // Once sent, a message arrives whether or not its sender still
        // waits for the answer: the delivery runs on its own, as a real
        // network's does (a forward that arrives after its forwarder gave
        // up on it still runs there).
        let (net, to_node) = (self.net.clone(), to.clone());
        let delivered = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // A node that crashed while the message was in flight never sees it.
            if net.with(|s| s.down.contains(&to_node)) {
                return None;
            }
            Some(deliver(&net, &to_node, handler, request).await)
        });
        let response = match delivered.await {
            Ok(Some(response)) => response,
            // A handler's panic (a failed assertion) fails the test, as it
            // did when the handler ran in the caller's task.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(None) | Err(_) => return std::future::pending().await,
        };
        let Ok(back) = self.net.route(to, &self.from, &format!("{what} reply")) else {
            return std::future::pending().await;
        };
        let back = back
            + self.net.transfer(to, &self.from, || {
                ringkv_core::wire::encode_response(&response).len()
            });
        tokio::time::sleep(back).await;
        Ok(response)
    }
}

/// What `to`'s handler answers `request`, or the failure `net` makes it
/// answer.
async fn deliver(
    net: &SimNetwork,
    to: &NodeId,
    handler: Arc<dyn SimHandler>,
    request: Request,
) -> Response {
    let listing_max = net.with(|s| s.leaf_listing_max.get(to).copied());
    let too_many_leaves = match (&request, listing_max) {
        (Request::Replica(ReplicaRequest::LeafItems { leaves, .. }), Some(max)) => {
            leaves.len() > max
        }
        _ => false,
    };
    let failing_leaf = net.with(|s| s.failing_leaf.get(to).copied());
    let damaged = match (&request, failing_leaf) {
        (Request::Replica(ReplicaRequest::LeafItems { leaves, .. }), Some(bad)) => {
            bad.is_none_or(|bad| leaves.contains(&bad))
        }
        _ => false,
    };
    if let Some(kind) = net.with(|s| s.failing.get(to).copied()) {
        let what = match kind {
            ErrorKind::Overloaded => "is overloaded".to_string(),
            other => format!("answers {other:?}"),
        };
        Response::error(kind, format!("{to} {what}"))
    } else if damaged {
        Response::error(
            ErrorKind::Internal,
            format!("{to} could not read its index in one leaf"),
        )
    } else if too_many_leaves {
        net.with(|s| s.leaf_listings_refused += 1);
        Response::error(
            ErrorKind::Unavailable,
            format!(
                "the answer would pass the {}",
                ringkv_core::wire::OVER_FRAME_LIMIT
            ),
        )
    } else {
        handler.handle(request).await
    }
}

/// A simulated node: an in-memory replica, its hints and a coordinator.
pub struct SimNode {
    pub replica: Arc<ReplicaService<Arc<MemStore>>>,
    pub anti_entropy: Arc<AntiEntropy<SimTransport>>,
    pub coordinator: Arc<Coordinator<SimTransport>>,
    pub hints: Arc<HintBook<MemHintBackend>>,
    pub detector: Arc<FailureDetector>,
    refuses_hints: std::sync::atomic::AtomicBool,
}

impl SimNode {
    /// From now on, refuse hinted writes, and reads of hints, as a node
    /// with `--no-hints` does.
    pub fn refuse_hints(&self) {
        self.refuses_hints
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl SimHandler for SimNode {
    fn handle(
        &self,
        request: Request,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + '_>> {
        Box::pin(async move {
            match request {
                Request::Put(p) => self.coordinator.put(p).await,
                Request::Get(g) => self.coordinator.get(g).await,
                // As a `--no-hints` node: neither hints nor reads of them.
                Request::Replica(
                    ReplicaRequest::Hint { .. }
                    | ReplicaRequest::Read {
                        hint_for: Some(_), ..
                    },
                ) if self.refuses_hints.load(std::sync::atomic::Ordering::SeqCst) => {
                    Response::error(
                        ringkv_core::wire::ErrorKind::Unavailable,
                        HintError::Disabled.to_string(),
                    )
                }
                Request::Replica(ReplicaRequest::Handoff { key, clock }) => {
                    let ring = self.coordinator.ring();
                    let me = self.coordinator.id();
                    match crate::replica::handoff_refusal(Some(&ring), me, &key) {
                        Some(refusal) => refusal,
                        None => self.replica.handle(ReplicaRequest::Handoff { key, clock }),
                    }
                }
                Request::Replica(r) => match self.anti_entropy.answer(&r) {
                    Some(answer) => answer,
                    None => self.replica.handle(r),
                },
                Request::Ping => Response::Pong,
                Request::Stats => Response::Stats(NodeStats {
                    hints_pending: self.hints.pending_total(),
                    last_exchange_unix_ms: self.anti_entropy.last_round_unix_ms(),
                    keys_repaired: self.anti_entropy.keys_repaired(),
                    leave_keys_sent: 0,
                    leaving: false,
                    removed: false,
                    cleanup_keys_scanned: 0,
                    cleaning: false,
                }),
                Request::Repair => {
                    let up = self.detector.clone();
                    Response::Repair(self.anti_entropy.round(&move |p| up.is_up(p)).await)
                }
                other => Response::error(
                    ringkv_core::wire::ErrorKind::InvalidRequest,
                    format!("{} is not simulated", label(&other)),
                ),
            }
        })
    }
}

/// Per-key actor suffixes 1, 2, 3, … rather than random ones, so that a
/// simulated run replays exactly (no node restarts here, so a counter from
/// 1 cannot repeat one).
fn counted_key_actors() -> crate::replica::KeyActorSource {
    let next = Arc::new(std::sync::atomic::AtomicU32::new(1));
    Arc::new(move || next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// N simulated nodes `n1..` on one ring and one network.
pub struct SimCluster {
    pub net: SimNetwork,
    pub nodes: Vec<(NodeId, Arc<SimNode>)>,
    pub ring: Arc<Ring>,
    /// Keeps the background workers (read repair, handoff, probes) running
    /// for the cluster's lifetime.
    _shutdown: tokio::sync::watch::Sender<bool>,
}

/// The cluster id simulated nodes use in context tokens.
pub const SIM_CLUSTER_ID: u64 = 0x51;

/// How a [`SimCluster`] is built.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub max_siblings: usize,
    /// Whether writes may go to fallbacks as hints.
    pub hinted_handoff: bool,
    pub hint_ttl: Duration,
    /// How often expired hints are swept; `None`: the default for `hint_ttl`.
    pub hint_sweep_interval: Option<Duration>,
    /// Hints a node holds for one owner at most.
    pub hint_max_per_target: u64,
    /// Run each node's failure-detector probe loop. Off, a node learns of
    /// failures only from request outcomes, and unanswered requests do not
    /// count, so nothing is ever judged down.
    pub probes: bool,
    /// The share of quorum reads that ask every replica.
    pub read_repair_chance: f64,
    /// Each anti-entropy call's base timeout (`AntiEntropyConfig`).
    pub anti_entropy_call_timeout: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            max_siblings: 100,
            hinted_handoff: true,
            hint_ttl: Duration::from_secs(ringkv_repair::hints::DEFAULT_HINT_TTL_S),
            hint_sweep_interval: None,
            hint_max_per_target: ringkv_repair::hints::DEFAULT_MAX_HINTS_PER_TARGET,
            probes: false,
            read_repair_chance: crate::coordinator::DEFAULT_READ_REPAIR_CHANCE,
            anti_entropy_call_timeout: AntiEntropyConfig::default().call_timeout,
        }
    }
}

/// Simulated nodes keep small trees (256 leaves): their leaf listings scan
/// every key.
const SIM_LEAF_BITS: u32 = 8;

/// How often simulated probe loops run.
const SIM_PROBE_TICK: Duration = Duration::from_millis(250);

impl SimCluster {
    /// `nodes` nodes named `n1..`, replicating `replicas` times, 16 vnodes each.
    pub fn new(nodes: usize, replicas: usize, seed: u64) -> Self {
        Self::with_options(nodes, replicas, seed, SimOptions::default())
    }

    pub fn with_limits(nodes: usize, replicas: usize, seed: u64, max_siblings: usize) -> Self {
        Self::with_options(
            nodes,
            replicas,
            seed,
            SimOptions {
                max_siblings,
                ..SimOptions::default()
            },
        )
    }

    pub fn with_options(nodes: usize, replicas: usize, seed: u64, options: SimOptions) -> Self {
        let net = SimNetwork::new(seed);
        let ids: Vec<NodeId> = (1..=nodes)
            .map(|i| NodeId::new(format!("n{i}")).expect("valid id"))
            .collect();
        let ring =
            Arc::new(Ring::new(ids.iter().map(|n| (n.clone(), 16)), replicas).expect("valid ring"));
        let (shutdown, _) = tokio::sync::watch::channel(false);
        // Wall time for hints: tokio's (pausable) clock from a fixed origin.
        let origin = tokio::time::Instant::now();
        let now_ms: WallClock = Arc::new(move || 1_000_000 + origin.elapsed().as_millis() as u64);
        let nodes = ids
            .iter()
            .map(|id| {
                let transport = Arc::new(net.transport(id.clone()));
                let (queue, _worker) = ReadRepairQueue::start(
                    transport.clone(),
                    DEFAULT_QUEUE_CAPACITY,
                    shutdown.subscribe(),
                );
                let detector = Arc::new(FailureDetector::new(DetectorConfig::default()));
                let hints = Arc::new(
                    HintBook::open(
                        MemHintBackend::default(),
                        HintConfig {
                            ttl_ms: options.hint_ttl.as_millis() as u64,
                            max_per_target: options.hint_max_per_target,
                            ..HintConfig::default()
                        },
                        now_ms.clone(),
                    )
                    .expect("an empty in-memory book opens"),
                );
                let coordinator = Coordinator::new(
                    id.clone(),
                    SIM_CLUSTER_ID,
                    ring.clone(),
                    transport.clone(),
                    CoordinatorConfig {
                        hinted_handoff: options.hinted_handoff,
                        read_repair_chance: options.read_repair_chance,
                        ..CoordinatorConfig::default()
                    },
                )
                .with_read_repair(queue)
                .with_failure_detector(detector.clone())
                .with_wall_clock(now_ms.clone());
                let up = detector.clone();
                handoff::start(
                    hints.clone(),
                    transport.clone(),
                    HintRouting::to_owners(Arc::new(move |n: &NodeId| up.is_up(n))),
                    HandoffConfig {
                        sweep_interval: options
                            .hint_sweep_interval
                            .unwrap_or(HandoffConfig::for_ttl(options.hint_ttl).sweep_interval),
                        ..HandoffConfig::for_ttl(options.hint_ttl)
                    },
                    shutdown.subscribe(),
                );
                if options.probes {
                    let peers: Vec<NodeId> = ids.iter().filter(|p| *p != id).cloned().collect();
                    tokio::spawn(probe_loop(
                        detector.clone(),
                        transport.clone(),
                        peers,
                        shutdown.subscribe(),
                    ));
                }
                let store = Arc::new(MemStore::default());
                let trees = Arc::new(
                    ReplicaTrees::new(id.clone(), ring.clone(), SIM_LEAF_BITS)
                        .expect("a valid tree shape"),
                );
                trees.rebuild(ring.clone(), std::iter::empty());
                let anti_entropy = Arc::new(AntiEntropy::new(
                    trees.clone(),
                    store.clone(),
                    transport.clone(),
                    AntiEntropyConfig {
                        call_timeout: options.anti_entropy_call_timeout,
                        ..AntiEntropyConfig::default()
                    },
                    now_ms.clone(),
                ));
                let node = Arc::new(SimNode {
                    replica: Arc::new(
                        ReplicaService::new(id.clone(), store, options.max_siblings)
                            .with_hints(hints.clone())
                            .with_observer(trees)
                            .with_key_actors(counted_key_actors()),
                    ),
                    anti_entropy,
                    coordinator: Arc::new(coordinator),
                    hints,
                    detector,
                    refuses_hints: Default::default(),
                });
                net.register(id.clone(), node.clone());
                (id.clone(), node)
            })
            .collect();
        SimCluster {
            net,
            nodes,
            ring,
            _shutdown: shutdown,
        }
    }

    /// Hints held by every node, in total.
    pub fn hints_pending(&self) -> u64 {
        self.nodes
            .iter()
            .map(|(_, n)| n.hints.pending_total())
            .sum()
    }

    pub fn id(&self, name: &str) -> NodeId {
        NodeId::new(name).expect("valid id")
    }

    pub fn node(&self, name: &str) -> &Arc<SimNode> {
        &self
            .nodes
            .iter()
            .find(|(id, _)| id.as_str() == name)
            .unwrap_or_else(|| panic!("no node {name}"))
            .1
    }

    /// A put sent by a client to `via` (the client itself is never cut off).
    pub async fn put(
        &self,
        via: &str,
        key: &str,
        value: &str,
        w: Consistency,
        context: Option<String>,
    ) -> Response {
        let request = PutRequest::new(key, Payload::Value(value.as_bytes().to_vec()), w, context);
        self.node(via).coordinator.put(request).await
    }

    /// A `--strict` put (Riak's PW: no stand-ins) sent by a client to `via`.
    pub async fn put_strict(
        &self,
        via: &str,
        key: &str,
        value: &str,
        w: Consistency,
        context: Option<String>,
    ) -> Response {
        let request = PutRequest {
            strict: true,
            ..PutRequest::new(key, Payload::Value(value.as_bytes().to_vec()), w, context)
        };
        self.node(via).coordinator.put(request).await
    }

    pub async fn get(&self, via: &str, key: &str, r: Consistency) -> Response {
        self.get_with(via, key, r, false).await
    }

    /// A get that, with `wait_repair`, answers only after read repair.
    pub async fn get_with(
        &self,
        via: &str,
        key: &str,
        r: Consistency,
        wait_repair: bool,
    ) -> Response {
        self.node(via)
            .coordinator
            .get(GetRequest {
                wait_repair,
                ..GetRequest::new(key, r)
            })
            .await
    }

    /// One anti-entropy round run by `node` now, as `ringkv repair` asks it.
    pub async fn repair(&self, node: &str) -> ringkv_core::wire::RepairReport {
        match self.node(node).handle(Request::Repair).await {
            Response::Repair(report) => report,
            other => panic!("repair on {node} answered {other:?}"),
        }
    }

    /// The values `node` holds locally for `key`, sorted.
    pub fn local_values(&self, node: &str, key: &str) -> Vec<String> {
        let clock = self
            .node(node)
            .replica
            .read(key.as_bytes())
            .expect("mem store");
        let mut values: Vec<String> = clock
            .map(|c| {
                c.values()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        values.sort();
        values
    }
}

/// The values of a get reply, sorted, as text; panics on any other reply.
pub fn get_values(r: &Response) -> Vec<String> {
    match r {
        Response::Get(g) => {
            let mut v: Vec<String> = g
                .values
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            v.sort();
            v
        }
        other => panic!("expected a get reply, got {other:?}"),
    }
}

/// A simulated node's probe loop, like the real node's.
async fn probe_loop(
    detector: Arc<FailureDetector>,
    transport: Arc<SimTransport>,
    peers: Vec<NodeId>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(SIM_PROBE_TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        probe_round(&detector, &transport, &peers).await;
    }
}
