//! Coordinating a client request (Dynamo §4.5, "Execution of get() and put()").
//!
//! Any node accepts a request. If it is not in the key's preference list it
//! forwards the request to the first replica that answers (or, believing
//! them all down, stands in for them; see below); otherwise it
//! coordinates:
//!
//! - **put**: apply the write locally, minting a new dot ([`ReplicaRequest::Update`]),
//!   then send the resulting clock to the other N-1 replicas in parallel
//!   ([`ReplicaRequest::Sync`]) and answer once W replicas (itself included)
//!   hold it. The remaining sends carry on after the answer, until the request
//!   deadline, so every reachable replica gets the write.
//! - **get**: ask R replicas for their clock (itself and the peers that
//!   answered fastest lately; see [`crate::latency`]), and a spare replica
//!   when one of them fails or is late; answer once R have replied, with the
//!   causal merge of those replies: every concurrent value, and a context
//!   covering all of them. A share of reads (`read_repair_chance`) asks all
//!   N, as Dynamo always does, so read repair sees every replica.
//!
//! **Sloppy quorum** (Dynamo §4.6): R and W count one slot per
//! preference-list node, and a healthy fallback may fill the slot of a node
//! that is down, failing, or (for writes) silent for a quarter of the
//! deadline: the write goes to it as a hint ([`ReplicaRequest::Hint`]), the
//! read asks it for its hinted copy. A write acknowledged before a replica
//! failed still gets a stand-in for it, after the answer, until the deadline.
//! `strict` requests (PW/PR) use no stand-ins. An owner believed down is not
//! asked while a stand-in is left for it; when its last one fails, it is
//! asked after all (the failure detector can be wrong, say just after the
//! owner came back), for at most the stand-in delay, so that a slot with no
//! one left still fails well before the deadline; after a write's answer,
//! by the task that places its late hints. Its slot, left uncovered by a
//! failure elsewhere (a spare may take its fallback), gets the next
//! fallback, or the owner itself once none is left; and it is asked when
//! its stand-in stays silent as long as a silent owner gets before a
//! stand-in.
//!
//! A node outside the preference list that believes every owner down does
//! not forward the request to them (none would answer): the first healthy
//! fallback that takes it coordinates it, standing in for the first owner
//! (the fallbacks before this node in ring order that it believes up, in
//! turn, then this node; see [`Coordinator::outsider_route`]). A put is
//! minted on the hint that node holds for the first owner
//! ([`ReplicaRequest::Update`] with `hint_for`; see
//! [`crate::replica::ReplicaService::update_for`]) and sent on to
//! fallbacks for the others; a get reads that hint and theirs.
//!
//! When W (or R) cannot be met before the deadline the answer is a quorum
//! error naming who answered and who did not. Dynamo does not roll a write
//! back: the replicas that did acknowledge keep it, and the error says so.
//!
//! **Shutdown.** The coordinator keeps count of its requests under way and
//! of the tasks they leave running: the sends that outlive their answer,
//! the late hints and the read-repair collection. [`Coordinator::close`]
//! stops them all at their next await and waits until the last has ended,
//! so the transport (and through it the node's database) is let go of when
//! the node's shutdown returns, not at some request's deadline. A request
//! under way answers "unavailable" (a write may be stored on this node); one
//! that arrives later is refused as "not serving", before it writes
//! anything, so the client may send it elsewhere as it is.
//!
//! Time comes from tokio's clock, which scenario tests pause and advance, and
//! the network is the [`Transport`] trait; the counting itself is the
//! sans-I/O [`QuorumTracker`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metrics::{counter, histogram};
use ringkv_core::context::CausalContext;
use ringkv_core::dvv::{Clock, Payload, VersionVector};
use ringkv_core::wire::{
    ErrorKind, ErrorReply, GetReply, GetRequest, PutReply, PutRequest, ReplicaRequest, Request,
    Response, MALFORMED_REQUEST,
};
use ringkv_core::{NodeId, Transport, TransportError};
use ringkv_repair::read_repair::{repair_now, stale_replicas, ReadRepairQueue, RepairJob};
use ringkv_ring::{PreferenceList, Ring};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// One node's answer in a fan-out (or why there is none), and its latency
/// since the request began, in microseconds.
type LateReply = (
    NodeId,
    Result<Result<Response, TransportError>, tokio::time::error::Elapsed>,
    u64,
);

/// Answers still arriving from a fan-out after its quorum was decided.
type LateReplies = mpsc::Receiver<LateReply>;

use crate::failure::FailureDetector;
use crate::latency::ReplicaLatency;
use crate::quorum::{QuorumState, QuorumTracker, ReplicaAnswer};

pub use ringkv_core::wire::DEFAULT_REQUEST_TIMEOUT_MS;
/// The default largest value a node accepts.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 4 * 1024 * 1024;
/// The longest deadline a client may ask for; bounds how long in-flight
/// replica sends can outlive their request.
pub const REQUEST_TIMEOUT_MS_MAX: u32 = 60_000;

/// Limits a coordinator enforces on every request.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub max_value_bytes: usize,
    /// Whether writes may go to fallbacks, as hints, when a replica is down
    /// (the sloppy quorum). Off with `--no-hints`; reads still use fallbacks.
    pub hinted_handoff: bool,
    /// The share of quorum reads (0 to 1) that ask every replica rather than
    /// R of them, so that read repair judges them all.
    pub read_repair_chance: f64,
}

/// Cassandra's long-standing default for the same knob.
pub const DEFAULT_READ_REPAIR_CHANCE: f64 = 0.1;

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            hinted_handoff: true,
            read_repair_chance: DEFAULT_READ_REPAIR_CHANCE,
        }
    }
}

/// Coordinates client requests for one node.
pub struct Coordinator<T> {
    id: NodeId,
    cluster_id: u64,
    ring: RwLock<Arc<Ring>>,
    transport: Arc<T>,
    config: CoordinatorConfig,
    /// Where reads hand stale replicas for repair; `None` disables read repair.
    read_repair: Option<ReadRepairQueue>,
    /// Told every replica's outcome, so requests double as failure probes.
    detector: Option<Arc<FailureDetector>>,
    /// Set while the node leaves the cluster: it then stands in for no
    /// owner (its hints would leave with it).
    leaving: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Bounds the tasks that place hints after a write's quorum.
    late_hint_tasks: Arc<tokio::sync::Semaphore>,
    /// Recent latency per peer: who a read asks first.
    latency: Arc<ReplicaLatency>,
    /// Quorum reads so far, to pick every `1/read_repair_chance`-th as a full read.
    reads: AtomicU64,
    /// Every request under way, and every task a request leaves behind
    /// (sends, late hints, repair collection), holds a receiver: their count
    /// is what is still running, and [`Coordinator::close`] sets the value
    /// to tell them all to stop.
    closing: watch::Sender<bool>,
    /// Unix ms, from the node's wall clock (or the simulation's): what a
    /// forward's `not_after_unix_ms` is set and checked by. `None`: neither.
    wall_clock: Option<WallClock>,
}

/// A wall clock in Unix ms, passed in so that tests can drive it.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

impl<T: Transport> Coordinator<T> {
    /// Dates forwarded writes by `clock`, and refuses those that arrive past
    /// their date (see [`PutRequest::not_after_unix_ms`]).
    pub fn with_wall_clock(mut self, clock: WallClock) -> Self {
        self.wall_clock = Some(clock);
        self
    }

    /// Feeds every replica outcome to `detector`.
    pub fn with_failure_detector(mut self, detector: Arc<FailureDetector>) -> Self {
        self.detector = Some(detector);
        self
    }

    /// Enables read repair through `queue`.
    pub fn with_read_repair(mut self, queue: ReadRepairQueue) -> Self {
        self.read_repair = Some(queue);
        self
    }

    /// While `leaving` is set, this node coordinates no request as the
    /// owners' stand-in (see [`Self::outsider_route`]).
    pub fn with_leaving_flag(mut self, leaving: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.leaving = Some(leaving);
        self
    }

    pub fn new(
        id: NodeId,
        cluster_id: u64,
        ring: Arc<Ring>,
        transport: Arc<T>,
        config: CoordinatorConfig,
    ) -> Self {
        Coordinator {
            id,
            cluster_id,
            ring: RwLock::new(ring),
            transport,
            config,
            read_repair: None,
            detector: None,
            leaving: None,
            late_hint_tasks: Arc::new(tokio::sync::Semaphore::new(LATE_HINT_TASKS_MAX)),
            latency: Arc::new(ReplicaLatency::new()),
            reads: AtomicU64::new(0),
            closing: watch::Sender::new(false),
            wall_clock: None,
        }
    }

    /// Stops every request under way and every task a request left running
    /// (see the module docs), and waits until they have all ended and
    /// dropped their transport. Requests that arrive later are refused.
    pub async fn close(&self) {
        self.closing.send_replace(true);
        self.closing.closed().await;
    }

    /// Requests under way and tasks they left running; 0 once
    /// [`Self::close`] has returned, for good.
    pub fn tasks_running(&self) -> usize {
        self.closing.receiver_count()
    }

    /// Runs `request` unless [`Self::close`] was called, and stops it if
    /// `close` is called while it runs.
    async fn unless_closed(
        &self,
        request: impl std::future::Future<Output = Response>,
    ) -> Response {
        let mut closing = self.closing.subscribe();
        if *closing.borrow_and_update() {
            return Response::error(
                ErrorKind::NotServing,
                format!("{} is shutting down; ask another node", self.id),
            );
        }
        tokio::select! {
            biased;
            true = async { closing.wait_for(|closing| *closing).await.is_ok() } => unavailable(format!(
                "{} shut down while serving the request; a write may be stored on {}: read the key through another node before writing it again",
                self.id, self.id
            )),
            response = request => response,
        }
        // `closing` drops after `request`: close() waits for that.
    }

    /// Runs `task` unless or until [`Self::close`] is called.
    fn spawn_detached(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut closing = self.closing.subscribe();
        if *closing.borrow_and_update() {
            return;
        }
        // Boxed so that the task's future, moved into the task and rewritten
        // at each stage change, stays small (a send's is about 1.7 KiB).
        let task = Box::pin(task);
        tokio::spawn(async move {
            tokio::select! {
                biased;
                // Not when the coordinator is dropped: only close() stops them.
                true = async { closing.wait_for(|closing| *closing).await.is_ok() } => {}
                () = task => {}
            }
            // `closing` drops here, after `task`: close() waits for that.
        });
    }

    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// The ring placement currently uses.
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the ring after a membership change. Latency averages of
    /// nodes no longer in it are dropped.
    pub fn set_ring(&self, ring: Arc<Ring>) {
        let members = ring.nodes();
        self.latency.retain(|node| members.contains(node));
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = ring;
    }

    /// Serves a client's put (or delete).
    pub async fn put(&self, request: PutRequest) -> Response {
        let start = Instant::now();
        let op = if request.payload == Payload::Tombstone {
            "delete"
        } else {
            "put"
        };
        let response = self.unless_closed(self.put_inner(request, start)).await;
        record_metrics(op, &response, start);
        response
    }

    /// Serves a client's get.
    pub async fn get(&self, request: GetRequest) -> Response {
        let start = Instant::now();
        let response = self.unless_closed(self.get_inner(request, start)).await;
        record_metrics("get", &response, start);
        response
    }

    async fn put_inner(&self, request: PutRequest, start: Instant) -> Response {
        if let Payload::Value(v) = &request.payload {
            if v.len() > self.config.max_value_bytes {
                return invalid(format!(
                    "value is {} bytes; this node accepts at most {} (--max-value-bytes)",
                    v.len(),
                    self.config.max_value_bytes
                ));
            }
        }
        let deadline = match deadline(start, request.timeout_ms) {
            Ok(d) => d,
            Err(e) => return e,
        };
        let ring = self.ring();
        let required = match request.w.required(ring.replicas()) {
            Ok(k) => k,
            Err(e) => return invalid(format!("w: {e}")),
        };
        if request.overwrite && request.context.is_some() {
            return invalid("an overwrite replaces every version: it takes no context");
        }
        let context = match &request.context {
            None => VersionVector::new(),
            Some(token) => match CausalContext::decode_for(token, self.cluster_id, &request.key) {
                Ok(vv) => vv,
                Err(e) => return invalid(e.message),
            },
        };
        let pref = ring.preference_list(&request.key);
        if let Some(refusal) = too_few_members("w", required, &pref, "nothing was written") {
            return refusal;
        }
        let sloppy = !request.strict && self.config.hinted_handoff;
        // The owner whose slot this node fills by minting on its hint for
        // it, when it replicates none of the key and can reach none of
        // those that do.
        let mut stand_in_for = None;
        let op = if request.payload == Payload::Tombstone {
            "delete"
        } else {
            "put"
        };
        if !pref.contains(&self.id) {
            let resend = || {
                Request::Put(PutRequest {
                    forwarded: true,
                    ..request.clone()
                })
            };
            match self
                .as_outsider(&pref, request.strict, request.forwarded, resend, deadline)
                .await
            {
                Outsider::Answered(response) => return response,
                Outsider::StandIn(owner) => stand_in_for = Some(owner),
                // Sent here by a node whose ring says this one replicates
                // the key; this node's ring says not. Minting here would
                // build on whatever copy it holds from an older ring (maybe
                // a value whose tombstone the replicas have since
                // collected) and hand that on to them. Nothing ran: the
                // forwarder asks the next replica.
                Outsider::Refused => {
                    return Response::error(
                        ErrorKind::NotServing,
                        format!(
                            "{} does not replicate this key under its ring, nor stands in for \
                             its replicas (it believes one up, it is leaving, or it is not among \
                             the key's fallbacks); ask another node",
                            self.id
                        ),
                    )
                }
            }
        }

        if let Some(refusal) = self.past_its_forward(&request) {
            return refusal;
        }
        // Mint the new version locally first: the dot must come from a node
        // that has every earlier dot of its own for this key (its copy's,
        // or as a stand-in its hint's).
        let mint = ReplicaRequest::Update {
            key: request.key.clone(),
            context: context.clone(),
            payload: request.payload,
            overwrite: request.overwrite,
            hint_for: stand_in_for.clone(),
        };
        let clock = match self.call(&self.id, Request::Replica(mint), deadline).await {
            Ok(Response::Clock(Some(clock))) => clock,
            // A stand-in whose hints refused the write (full, say) stored
            // nothing: the node that forwarded it here may take it instead.
            Ok(Response::Error(e))
                if e.kind == ErrorKind::Unavailable
                    && stand_in_for.is_some()
                    && request.forwarded =>
            {
                return Response::error(ErrorKind::NotServing, e.message)
            }
            Ok(Response::Error(e)) => return Response::Error(e),
            Ok(other) => return internal(format!("local replica answered {other:?}")),
            Err(reason) => {
                return unavailable(format!(
                    "the coordinator's own write did not complete ({reason}); \
                     the value may be stored on {} only",
                    self.id
                ))
            }
        };
        // Counted once it took the write: a forwarded one its hints
        // refused goes on to be counted where it is taken.
        if stand_in_for.is_some() {
            counter!("ringkv_stand_in_coordinations_total", "op" => op).increment(1);
        }
        let mut tracker = QuorumTracker::new(pref.replicas.iter().cloned(), required);
        if let Some(owner) = &stand_in_for {
            take_slot_of(&mut tracker, owner, &self.id);
        }
        tracker.record(
            &self.id,
            ReplicaAnswer::Ok {
                latency_us: elapsed_us(start),
            },
        );
        let sync = Request::Replica(ReplicaRequest::Sync {
            key: request.key.clone(),
            clock: clock.clone(),
        });
        let hint = |owner: &NodeId| {
            Request::Replica(ReplicaRequest::Hint {
                owner: owner.clone(),
                key: request.key.clone(),
                clock: clock.clone(),
            })
        };
        let mut stand_ins = StandIns {
            candidates: self.healthy_fallbacks(&pref.fallbacks),
            request_for: sloppy.then_some(&hint as &(dyn Fn(&NodeId) -> Request + Sync)),
            replace_silent: true,
            // From now, when the sends go out, not from the request's start:
            // a slow local write must not use up the owners' time to answer.
            after: stand_in_after(Instant::now(), deadline),
            spares: VecDeque::new(),
            speculate_at: None,
            held_back: Vec::new(),
        };
        // The coordinator's own write is already done (for itself, or for
        // the owner it stands in for).
        let others: Vec<NodeId> = pref
            .replicas
            .iter()
            .filter(|n| **n != self.id && Some(*n) != stand_in_for.as_ref())
            .cloned()
            .collect();
        let targets = self.plan(&others, &sync, &mut stand_ins, &mut tracker);
        let (late, unused) = self
            .fan_out(
                targets,
                stand_ins,
                &mut tracker,
                start,
                deadline,
                |_, response| match response {
                    Response::Clock(_) => Ok(()),
                    other => Err(reply_error(other)),
                },
            )
            .await;
        if sloppy && tracker.state() == QuorumState::Reached {
            self.hint_late_failures(
                late,
                tracker.clone(),
                unused,
                request.key.clone(),
                clock.clone(),
                deadline,
            );
        }

        // Hand back a context covering the new clock only if the client has
        // seen all of it: with concurrent siblings left, a context covering
        // them would let the next write discard values nobody read.
        let siblings = clock.sibling_count();
        let reply_context = if siblings == 1 {
            clock.context()
        } else {
            context
        };
        match tracker.state() {
            QuorumState::Reached => Response::Put(PutReply {
                context: CausalContext::new(self.cluster_id, &request.key, reply_context).encode(),
                siblings: siblings as u32,
                receipt: tracker.receipt(&self.id),
            }),
            _ => {
                let stored: Vec<&str> = tracker.succeeded().map(|n| n.as_str()).collect();
                // A replica that did not answer may have stored it too.
                let unanswered: Vec<&str> = tracker.unanswered().map(|n| n.as_str()).collect();
                let mut message =
                    format!("write quorum not reached: {}", tracker.failure_summary());
                if let Some(why) = no_stand_in(request.strict, self.config.hinted_handoff, &pref) {
                    message.push_str(&format!(
                        "; no stand-in took a failed replica's place: {why}"
                    ));
                }
                let may_be = match (stored.is_empty(), unanswered.is_empty()) {
                    (false, true) => format!("stored on {}", stored.join(", ")),
                    (false, false) => format!(
                        "stored on {}, and may be on {} (no answer in time)",
                        stored.join(", "),
                        unanswered.join(", ")
                    ),
                    (true, false) => {
                        format!(
                            "may be stored on {} (no answer in time)",
                            unanswered.join(", ")
                        )
                    }
                    (true, true) => String::new(),
                };
                if !may_be.is_empty() {
                    message.push_str(&format!(
                        "; the value is {may_be}: writes are not rolled back"
                    ));
                }
                Response::Error(ErrorReply {
                    kind: ErrorKind::QuorumNotReached,
                    message,
                    receipt: Some(tracker.receipt(&self.id)),
                })
            }
        }
    }

    async fn get_inner(&self, request: GetRequest, start: Instant) -> Response {
        let deadline = match deadline(start, request.timeout_ms) {
            Ok(d) => d,
            Err(e) => return e,
        };
        let ring = self.ring();
        // Before `local`, which the wire refuses alongside it: an
        // in-process caller that sets both still gets the owner check.
        if request.direct {
            // A client coordinates this read and counts this node as one
            // of the key's replicas: only an owner may answer for one.
            if !ring.is_replica(&request.key, &self.id) {
                counter!("ringkv_direct_reads_refused_total").increment(1);
                return Response::error(
                    ErrorKind::NotServing,
                    format!(
                        "{} is not one of the key's replicas under its ring; \
                         ask a coordinator instead",
                        self.id
                    ),
                );
            }
            counter!("ringkv_direct_reads_total").increment(1);
            return self.get_local(&request.key, start, deadline).await;
        }
        if request.local {
            return self.get_local(&request.key, start, deadline).await;
        }
        let required = match request.r.required(ring.replicas()) {
            Ok(k) => k,
            Err(e) => return invalid(format!("r: {e}")),
        };
        let pref = ring.preference_list(&request.key);
        if let Some(refusal) = too_few_members("r", required, &pref, "nothing was read") {
            return refusal;
        }
        let mut stand_in_for = None;
        if !pref.contains(&self.id) {
            let resend = || {
                Request::Get(GetRequest {
                    forwarded: true,
                    ..request.clone()
                })
            };
            match self
                .as_outsider(&pref, request.strict, request.forwarded, resend, deadline)
                .await
            {
                // The replica it went to could not reach enough of the
                // others, which this node may still reach (a partition
                // that cuts that replica off from its peers but not from
                // here): a read runs nothing that a second try would
                // repeat, so with time left this node asks the owners
                // itself, as below.
                Outsider::Answered(Response::Error(e))
                    if e.kind == ErrorKind::QuorumNotReached && Instant::now() < deadline =>
                {
                    counter!("ringkv_reads_retried_here_total").increment(1);
                }
                Outsider::Answered(response) => return response,
                Outsider::StandIn(owner) => {
                    counter!("ringkv_stand_in_coordinations_total", "op" => "get").increment(1);
                    stand_in_for = Some(owner);
                }
                // A read builds on nothing of this node's: it asks the
                // owners its ring names.
                Outsider::Refused => {}
            }
        }
        let mut tracker = QuorumTracker::new(pref.replicas.iter().cloned(), required);
        let mut merged = Clock::new();
        let mut replies: Vec<(NodeId, Option<Clock>)> = Vec::new();
        let read = Request::Replica(ReplicaRequest::Read {
            key: request.key.clone(),
            hint_for: None,
        });
        let read_for = |owner: &NodeId| {
            Request::Replica(ReplicaRequest::Read {
                key: request.key.clone(),
                hint_for: Some(owner.clone()),
            })
        };
        // Standing in for the first owner, this node reads its own hint
        // for it, and the others through stand-ins (they are believed
        // down) in ring order, as a write through it placed their hints;
        // then its own hints for the others (below).
        let (first, spares) = match &stand_in_for {
            Some(owner) => {
                let mut first: Vec<NodeId> = pref
                    .replicas
                    .iter()
                    .filter(|n| *n != owner)
                    .cloned()
                    .collect();
                let spares = first.split_off(required.saturating_sub(1).min(first.len()));
                (first, spares)
            }
            None => self.read_order(&pref.replicas, required),
        };
        let after = stand_in_after(start, deadline);
        let peers_first: Vec<NodeId> = first.iter().filter(|n| **n != self.id).cloned().collect();
        let mut stand_ins = StandIns {
            candidates: self.healthy_fallbacks(&pref.fallbacks),
            request_for: (!request.strict)
                .then_some(&read_for as &(dyn Fn(&NodeId) -> Request + Sync)),
            // A slow replica is still the one that has the data: reads wait
            // for it (and a spare replica) rather than count a fallback that
            // most likely has none.
            replace_silent: false,
            after,
            spares: spares.into_iter().map(|n| (n, read.clone())).collect(),
            speculate_at: Some(start + self.latency.speculate_after(&peers_first, after - start)),
            held_back: Vec::new(),
        };
        let mut targets = Vec::new();
        if let Some(owner) = &stand_in_for {
            take_slot_of(&mut tracker, owner, &self.id);
            targets.push((self.id.clone(), read_for(owner)));
        }
        targets.extend(self.plan(&first, &read, &mut stand_ins, &mut tracker));
        let owners = &pref.replicas;
        let (late, _) = self
            .fan_out(
                targets,
                stand_ins,
                &mut tracker,
                start,
                deadline,
                |node, response| match response {
                    Response::Clock(clock) => {
                        if let Some(clock) = &clock {
                            merged.sync(clock);
                        }
                        // A stand-in's copy counts for the answer, but only
                        // owners are judged (and repaired) by read repair.
                        if owners.contains(node) {
                            replies.push((node.clone(), clock));
                        }
                        Ok(())
                    }
                    other => Err(reply_error(other)),
                },
            )
            .await;
        if let (Some(owner), QuorumState::Reached) = (&stand_in_for, tracker.state()) {
            // What this node holds for the key's other owners counts too
            // (not toward R, so only once R is met): a write placed past a
            // fallback that refused it (its hints for that owner were
            // full) may have left a hint here, while that fallback still
            // takes the reads.
            for other in pref.replicas.iter().filter(|n| *n != owner) {
                match self.call(&self.id, read_for(other), deadline).await {
                    Ok(Response::Clock(Some(clock))) => merged.sync(&clock),
                    Ok(Response::Clock(None)) => {}
                    failed => {
                        tracing::debug!(?failed, %other, "reading own hint for the read failed")
                    }
                }
            }
        }
        match tracker.state() {
            QuorumState::Reached => {
                let reply = self.get_reply(&request.key, &merged, &tracker);
                self.read_repair(
                    ReadOutcome {
                        key: request.key,
                        owners: pref.replicas,
                        merged,
                        replies,
                    },
                    late,
                    deadline,
                    request.wait_repair,
                )
                .await;
                reply
            }
            _ => Response::Error(ErrorReply {
                kind: ErrorKind::QuorumNotReached,
                message: format!("read quorum not reached: {}", tracker.failure_summary()),
                receipt: Some(tracker.receipt(&self.id)),
            }),
        }
    }

    /// Repairs the replicas this read found stale (Dynamo's read repair).
    ///
    /// Replicas that answer shortly after the quorum count too, so this first
    /// waits for the rest of the answers, for at most [`REPAIR_COLLECT_GRACE`]
    /// and never past the request deadline. By default that wait and the
    /// repair happen after the client has its answer, in a task (at most
    /// `COLLECTING_MAX` at once, or the read skips repair) that hands the job
    /// to the node's bounded [`ReadRepairQueue`]. With `wait`, both happen
    /// before answering, within the deadline.
    async fn read_repair(
        &self,
        mut read: ReadOutcome,
        mut late: LateReplies,
        deadline: Instant,
        wait: bool,
    ) {
        let Some(queue) = self.read_repair.clone() else {
            return;
        };
        if !wait {
            // Usually every replica asked has answered by now (a read asks
            // only R): then judge at once, without a task.
            loop {
                match late.try_recv() {
                    Ok(message) => read.absorb(message),
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        queue.offer(read.into_job());
                        return;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                }
            }
        }
        let until = deadline.min(Instant::now() + REPAIR_COLLECT_GRACE);
        let finish = collect_repair(read, late, until);
        if wait {
            let transport = self.transport.clone();
            let _ = tokio::time::timeout_at(deadline, async move {
                let job = finish.await;
                repair_now(&transport, &job).await;
            })
            .await;
        } else if let Some(permit) = queue.begin_collecting() {
            self.spawn_detached(async move {
                queue.offer(finish.await);
                drop(permit);
            });
        }
    }

    async fn get_local(&self, key: &[u8], start: Instant, deadline: Instant) -> Response {
        let mut tracker = QuorumTracker::new([self.id.clone()], 1);
        let read = Request::Replica(ReplicaRequest::Read {
            key: key.to_vec(),
            hint_for: None,
        });
        match self.call(&self.id, read, deadline).await {
            Ok(Response::Clock(clock)) => {
                tracker.record(
                    &self.id,
                    ReplicaAnswer::Ok {
                        latency_us: elapsed_us(start),
                    },
                );
                self.get_reply(key, &clock.unwrap_or_default(), &tracker)
            }
            Ok(Response::Error(e)) => Response::Error(e),
            Ok(other) => internal(format!("local replica answered {other:?}")),
            Err(reason) => unavailable(format!("could not read locally: {reason}")),
        }
    }

    fn get_reply(&self, key: &[u8], merged: &Clock, tracker: &QuorumTracker) -> Response {
        Response::Get(GetReply {
            values: merged.values().map(<[u8]>::to_vec).collect(),
            context: CausalContext::new(self.cluster_id, key, merged.context()).encode(),
            receipt: tracker.receipt(&self.id),
        })
    }

    /// Whether the failure detector believes `node` is up (everyone is,
    /// without a detector).
    fn is_healthy(&self, node: &NodeId) -> bool {
        self.detector.as_ref().is_none_or(|d| d.is_up(node))
    }

    /// Where a request for a key this node does not replicate goes.
    ///
    /// To the owners, unless stand-ins are allowed (not `strict`, hints on)
    /// and the failure detector believes every owner down (never without a
    /// detector): then Dynamo's sloppy quorum takes it on the first healthy
    /// nodes of the preference list, and the first of those that takes it
    /// coordinates it, standing in for the first owner. So it goes to the
    /// fallbacks before this node in ring order that it believes up, and
    /// this node stands in itself if every one of them refuses it (it sees
    /// an owner up, it is leaving, its hints are full; see
    /// [`Self::try_forward`] for one that fails or is silent): while their
    /// detectors agree, every coordinator on one side of a partition places
    /// a key's writes, and reads them, alike. A request
    /// forwarded here is taken here or refused, never sent on (that could
    /// go round in circles). A leaving node stands in for no one (its hints
    /// would leave with it), nor does one past the key's fallbacks (a large
    /// ring): they try every fallback believed up.
    fn outsider_route(
        &self,
        pref: &PreferenceList,
        strict: bool,
        forwarded: bool,
    ) -> OutsiderRoute {
        let owners_only = if forwarded {
            OutsiderRoute::Refuse
        } else {
            OutsiderRoute::Forward {
                to: pref.replicas.clone(),
            }
        };
        if strict
            || !self.config.hinted_handoff
            || self.detector.is_none()
            || pref.replicas.iter().any(|n| self.is_healthy(n))
        {
            return owners_only;
        }
        let Some(owner) = pref.replicas.first().cloned() else {
            return owners_only;
        };
        // Only a node of the key's fallbacks may stand in: the others'
        // gets ask those, and a write held past them (a large ring, where
        // the list stops at `FALLBACKS_MIN`) would be one only this node's
        // reads find. Nor does a leaving node (its hints would leave with it).
        let may_stand_in = !self.is_leaving() && pref.fallbacks.contains(&self.id);
        if forwarded {
            return if may_stand_in {
                OutsiderRoute::StandIn {
                    owner,
                    via: Vec::new(),
                    here: true,
                }
            } else {
                OutsiderRoute::Refuse
            };
        }
        let via: Vec<NodeId> = pref
            .fallbacks
            .iter()
            .take_while(|n| !may_stand_in || **n != self.id)
            .filter(|n| **n != self.id && self.is_healthy(n))
            .cloned()
            .collect();
        if !may_stand_in && via.is_empty() {
            return owners_only;
        }
        OutsiderRoute::StandIn {
            owner,
            via,
            here: may_stand_in,
        }
    }

    /// Whether this node is leaving the cluster (see [`Self::with_leaving_flag`]).
    fn is_leaving(&self) -> bool {
        self.leaving
            .as_ref()
            .is_some_and(|l| l.load(Ordering::SeqCst))
    }

    /// The fallbacks believed up, in ring order: the sloppy quorum's stand-ins.
    fn healthy_fallbacks(&self, fallbacks: &[NodeId]) -> VecDeque<NodeId> {
        fallbacks
            .iter()
            .filter(|n| **n != self.id && self.is_healthy(n))
            .cloned()
            .collect()
    }

    /// Splits a read's owners into those asked at once and spares: itself
    /// first (no network hop), then healthy peers fastest first, R in all.
    /// Every owner when R = N. A `read_repair_chance` turn asks every owner
    /// believed up, so that read repair judges them all; one believed down
    /// stays a spare, asked (through a stand-in) only if an asked owner
    /// fails or stays silent until the stand-in delay: a stand-in asked up
    /// front would race the healthy owners for R with an answer that may
    /// lack the latest write.
    fn read_order(&self, owners: &[NodeId], required: usize) -> (Vec<NodeId>, Vec<NodeId>) {
        if required >= owners.len() {
            return (owners.to_vec(), Vec::new());
        }
        let full = self.full_read_turn();
        let mut order: Vec<NodeId> = owners.iter().filter(|n| **n != self.id).cloned().collect();
        self.latency.rank(&mut order);
        // Stable: peers believed down go last, otherwise fastest first.
        order.sort_by_key(|n| !self.is_healthy(n));
        if owners.contains(&self.id) {
            order.insert(0, self.id.clone());
        }
        let asked = if full {
            let up = order
                .iter()
                .filter(|n| **n == self.id || self.is_healthy(n))
                .count();
            required.max(up)
        } else {
            required
        };
        let spares = order.split_off(asked);
        (order, spares)
    }

    /// Whether this read is one of the `read_repair_chance` share that asks
    /// every replica. Deterministic: every read advances a counter, and a
    /// read is full when it carries the running share past a whole number.
    fn full_read_turn(&self) -> bool {
        let chance = self.config.read_repair_chance;
        if chance >= 1.0 {
            return true;
        }
        if chance <= 0.0 {
            return false;
        }
        let n = self.reads.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * chance).floor() > (n * chance).floor()
    }

    /// Chooses who first gets `request`: each of `replicas`, except that a
    /// node believed down is replaced up front by a stand-in (when stand-ins
    /// are allowed and one is left). The tracker learns of stand-ins before
    /// the owner is held back.
    fn plan(
        &self,
        replicas: &[NodeId],
        request: &Request,
        stand_ins: &mut StandIns<'_>,
        tracker: &mut QuorumTracker,
    ) -> Vec<(NodeId, Request)> {
        replicas
            .iter()
            .map(|owner| self.route(owner, request.clone(), stand_ins, tracker))
            .collect()
    }

    /// Where `owner`'s `request` goes: to the owner, or to a stand-in when
    /// the owner is believed down and one is left. An owner so replaced is
    /// held back with its request, to be asked after all if its stand-ins
    /// all fail: the failure detector may be wrong, and an owner it wrongly
    /// believes down is better than no write.
    fn route(
        &self,
        owner: &NodeId,
        request: Request,
        stand_ins: &mut StandIns<'_>,
        tracker: &mut QuorumTracker,
    ) -> (NodeId, Request) {
        if !self.is_healthy(owner) {
            if let Some(send) = stand_ins.next_for(owner, tracker) {
                tracker.hold_back(owner);
                stand_ins.held_back.push((owner.clone(), request));
                return send;
            }
        }
        tracker.mark_asked(owner);
        (owner.clone(), request)
    }

    /// The next spare replica of a read and its request (routed like the
    /// first targets), counted by `reason`.
    fn next_spare(
        &self,
        stand_ins: &mut StandIns<'_>,
        tracker: &mut QuorumTracker,
        reason: &'static str,
    ) -> Option<(NodeId, Request)> {
        let (owner, request) = stand_ins.spares.pop_front()?;
        counter!("ringkv_spare_reads_total", "reason" => reason).increment(1);
        Some(self.route(&owner, request, stand_ins, tracker))
    }

    /// Sends each target its request at once and records each answer in
    /// `tracker` until it is decided or the deadline passes.
    ///
    /// A node that fails (unreachable, or an error other than a refusal of
    /// the request itself) and leaves its slot uncovered gets a stand-in
    /// from `stand_ins`; for writes (`replace_silent`), so do owners that
    /// have not answered at all by `stand_ins.after`. An owner held back
    /// (believed down, replaced by a stand-in) whose slot nothing covers
    /// any more after a failure (its stand-in's, or one elsewhere that
    /// took its fallback) gets the next fallback, or is asked after all if
    /// none is left; it is asked too when its stand-in is still silent at
    /// `stand_ins.after` (or, sent from then on, as long after it was
    /// sent). Each send runs in its own task, bounded by the
    /// deadline (or by [`Self::close`]), so sends still running when the
    /// quorum is decided still reach their nodes. Returns the answers still to come, for callers
    /// that want them, and the fallbacks and held-back owners not used.
    async fn fan_out(
        &self,
        targets: Vec<(NodeId, Request)>,
        mut stand_ins: StandIns<'_>,
        tracker: &mut QuorumTracker,
        start: Instant,
        deadline: Instant,
        mut on_reply: impl FnMut(&NodeId, Response) -> Result<(), String>,
    ) -> (LateReplies, Unused) {
        // Even when the tracker is already decided (W=1 met by the local
        // write), every target still gets the request.
        // Each owner (a target or a spare) may also be asked after all,
        // once held back.
        let owners = targets.len() + stand_ins.spares.len();
        let capacity = 2 * owners + stand_ins.candidates.len();
        let (tx, mut rx) = mpsc::channel(capacity.max(1));
        // Requests sent and answers taken: the ones still on their way.
        let (sent, mut taken) = (AtomicUsize::new(0), 0usize);
        // `until`: when a send gives up; the deadline, but sooner for an
        // owner asked after all, believed down.
        let dispatch_until = |node: NodeId, request: Request, until: Instant| {
            sent.fetch_add(1, Ordering::Relaxed);
            let tx = tx.clone();
            let transport = self.transport.clone();
            let latency = (node != self.id).then(|| self.latency.clone());
            self.spawn_detached(async move {
                let sent = Instant::now();
                let result = tokio::time::timeout_at(until, transport.call(&node, request)).await;
                // Answers and timeouts (as their full wait) rank the peer; a
                // transport failure says nothing about its speed. A failure
                // to serve (a node shedding load, draining, or failing its
                // storage) comes at once and would rank a failing peer
                // fastest: it counts as `STAND_IN_AFTER_MAX`, about what a
                // silent peer costs. A refusal of the request itself (a
                // fallback's full hint store, a merge past the limits) says
                // nothing about the peer's speed as an owner.
                let sample_us = match &result {
                    Ok(Ok(Response::Error(e))) => match e.kind {
                        ErrorKind::Overloaded | ErrorKind::NotServing | ErrorKind::Internal => {
                            Some(STAND_IN_AFTER_MAX.as_micros() as u64)
                        }
                        _ => None,
                    },
                    Ok(Ok(_)) | Err(_) => Some(elapsed_us(sent)),
                    Ok(Err(_)) => None,
                };
                if let (Some(latency), Some(sample_us)) = (&latency, sample_us) {
                    latency.record(&node, sample_us);
                }
                let latency_us = elapsed_us(start);
                // The receiver is gone once the quorum is decided; that is fine.
                let _ = tx.send((node, result, latency_us)).await;
            });
        };
        let dispatch = |node: NodeId, request: Request| dispatch_until(node, request, deadline);
        // An owner held back whose last stand-in failed (or hangs): likely
        // down after all, it gets what a silent owner gets before a
        // stand-in, so that a slot with no one left fails soon, not at the
        // deadline.
        let ask_after_all =
            |owner: NodeId, stand_ins: &mut StandIns<'_>, tracker: &mut QuorumTracker| {
                if let Some(request) = stand_ins.ask_held_back(&owner, tracker) {
                    counter!("ringkv_held_back_owners_asked_total").increment(1);
                    dispatch_until(owner, request, stand_in_after(Instant::now(), deadline));
                }
            };
        for (node, request) in targets {
            dispatch(node, request);
        }
        // At `after`, a write gives its silent owners stand-ins; a read
        // still short asks its spares believed down, through stand-ins:
        // silent that long, an asked owner is failing rather than slow. An
        // owner held back behind a stand-in silent that long is asked after
        // all (writes and reads).
        let mut waited_for_silent = stand_ins.held_back.is_empty()
            && (stand_ins.request_for.is_none()
                || (!stand_ins.replace_silent && stand_ins.spares.is_empty()));
        // Stand-ins for held-back owners sent from `after` on, which that
        // timer no longer judges: each gets as long as a first one did, and
        // its owner is asked after all if it is still silent then.
        let stand_in_wait = stand_ins.after.saturating_duration_since(start);
        let mut silence_checks: VecDeque<(NodeId, Instant)> = VecDeque::new();
        // A slot left uncovered: the next fallback for `owner`, or `owner`
        // itself after all; a stand-in for an owner held back gets a
        // silence check once `after` has passed (`checks`).
        let cover = |owner: NodeId,
                     stand_ins: &mut StandIns<'_>,
                     tracker: &mut QuorumTracker,
                     checks: Option<&mut VecDeque<(NodeId, Instant)>>| {
            if let Some((stand_in, request)) = stand_ins.next_for(&owner, tracker) {
                if let Some(checks) = checks {
                    checks.extend(held_back_check(
                        &stand_in,
                        stand_ins,
                        tracker,
                        stand_in_wait,
                    ));
                }
                dispatch(stand_in, request);
            } else {
                ask_after_all(owner, stand_ins, tracker);
            }
        };
        while tracker.state() == QuorumState::Waiting {
            tokio::select! {
                // Answers already in count before a timer judges their
                // senders silent or the deadline passed.
                biased;
                message = rx.recv() => {
                    let Some((node, result, latency_us)) = message else { break };
                    taken += 1;
                    let (answer, replaceable) = self.judge(&node, result, latency_us, &mut on_reply);
                    if replaceable && !stand_ins.spares.is_empty() {
                        // A spare owner first: it holds the data, a fallback likely not.
                        if let Some((spare, request)) = self.next_spare(&mut stand_ins, tracker, "failure") {
                            if waited_for_silent {
                                silence_checks.extend(held_back_check(&spare, &stand_ins, tracker, stand_in_wait));
                            }
                            dispatch(spare, request);
                        }
                        // If `node` was the last stand-in for an owner held
                        // back, that owner is asked after all, as below.
                        if let Some(owner) = tracker.owner_of(&node).filter(|o| **o != node).cloned() {
                            if !stand_ins.would_stand_in() && tracker.slot_uncovered_without(&owner, &node, false) {
                                ask_after_all(owner, &mut stand_ins, tracker);
                            }
                        }
                    } else if replaceable {
                        if let Some(owner) = tracker.owner_of(&node).cloned() {
                            let owner_gave_up = waited_for_silent && stand_ins.replace_silent;
                            if tracker.slot_uncovered_without(&owner, &node, owner_gave_up) {
                                cover(owner, &mut stand_ins, tracker, waited_for_silent.then_some(&mut silence_checks));
                            }
                        }
                    }
                    tracker.record(&node, answer);
                    // Every owner held back whose slot nothing covers any
                    // more, not only the one whose stand-in failed just now
                    // (a spare may have taken its fallback), gets the next
                    // fallback, or is asked after all.
                    if replaceable && tracker.state() == QuorumState::Waiting && Instant::now() < deadline {
                        for owner in stand_ins.held_back.iter().map(|(o, _)| o.clone()).collect::<Vec<_>>() {
                            if tracker.slot_uncovered_without(&owner, &owner, false) {
                                cover(owner, &mut stand_ins, tracker, waited_for_silent.then_some(&mut silence_checks));
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(stand_ins.after), if !waited_for_silent => {
                    waited_for_silent = true;
                    // Before the spares below, whose stand-ins start now.
                    let behind_silence = tracker.held_back_behind_silence();
                    if stand_ins.replace_silent {
                        for owner in tracker.silent_owners() {
                            if let Some((stand_in, request)) = stand_ins.next_for(&owner, tracker) {
                                dispatch(stand_in, request);
                            }
                        }
                    } else {
                        let needed = tracker.required().saturating_sub(tracker.satisfied());
                        for _ in 0..needed {
                            let Some((node, request)) = self.next_spare(&mut stand_ins, tracker, "silent") else { break };
                            silence_checks.extend(held_back_check(&node, &stand_ins, tracker, stand_in_wait));
                            dispatch(node, request);
                        }
                        // Due at the same moment (slow peers put it at the
                        // cap), a speculative retry would ask as many again.
                        stand_ins.speculate_at = None;
                    }
                    for owner in behind_silence {
                        ask_after_all(owner, &mut stand_ins, tracker);
                    }
                }
                _ = tokio::time::sleep_until(stand_ins.speculate_at.unwrap_or(deadline)),
                    if stand_ins.speculate_at.is_some() && !stand_ins.spares.is_empty() => {
                    // Speculative retry: one spare per answer still needed.
                    // Only spares believed up (they come first): a stand-in
                    // for one believed down would put an answer that may
                    // lack the latest write in place of a healthy owner that
                    // is merely slow. Those wait for a failure.
                    let needed = tracker.required().saturating_sub(tracker.satisfied());
                    for _ in 0..needed {
                        let stand_in_next = stand_ins.spares.front().is_some_and(|(owner, _)| {
                            !self.is_healthy(owner) && stand_ins.would_stand_in()
                        });
                        if stand_in_next {
                            break;
                        }
                        let Some((node, request)) = self.next_spare(&mut stand_ins, tracker, "late") else { break };
                        dispatch(node, request);
                    }
                    // Once: later spares go only to failures.
                    stand_ins.speculate_at = None;
                }
                _ = tokio::time::sleep_until(silence_checks.front().map_or(deadline, |(_, due)| *due)),
                    if !silence_checks.is_empty() => {
                    let now = Instant::now();
                    while let Some((owner, due)) = silence_checks.front().cloned() {
                        if due > now {
                            break;
                        }
                        silence_checks.pop_front();
                        // A later stand-in for it has not been silent as long.
                        let later = silence_checks.iter().any(|(o, _)| *o == owner);
                        if !later && tracker.held_back_behind_silence().contains(&owner) {
                            ask_after_all(owner, &mut stand_ins, tracker);
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracker.expire(elapsed_us(start));
                }
            }
        }
        // Out of reach (say R=all with a replica down, which fails at once):
        // the answers already on their way still go in the receipt for a
        // moment, so the error names who answered rather than calling a
        // healthy replica silent.
        let settle_until = deadline.min(Instant::now() + FAILED_SETTLE);
        while tracker.state() == QuorumState::Failed && taken < sent.load(Ordering::Relaxed) {
            let Ok(Some((node, result, latency_us))) =
                tokio::time::timeout_at(settle_until, rx.recv()).await
            else {
                break;
            };
            taken += 1;
            let (answer, _) = self.judge(&node, result, latency_us, &mut on_reply);
            tracker.record(&node, answer);
        }
        let unused = Unused {
            candidates: stand_ins.candidates,
            held_back: stand_ins.held_back,
        };
        (rx, unused)
    }

    /// What an answer to a fan-out counts as, and whether a stand-in may
    /// replace a node that failed this way; the failure detector hears of
    /// it first.
    fn judge(
        &self,
        node: &NodeId,
        result: Result<Result<Response, TransportError>, tokio::time::error::Elapsed>,
        latency_us: u64,
        on_reply: &mut impl FnMut(&NodeId, Response) -> Result<(), String>,
    ) -> (ReplicaAnswer, bool) {
        if let Some(detector) = &self.detector {
            // A timeout says nothing: the deadline is the client's choice,
            // and the probes judge slowness fairly.
            if let Some(alive) = result.as_ref().ok().and_then(health_of) {
                detector.record(node, alive, Instant::now());
            }
        }
        match result {
            Err(_elapsed) => (ReplicaAnswer::Timeout { latency_us }, false),
            Ok(Err(e)) => (
                ReplicaAnswer::Error {
                    latency_us,
                    reason: transport_reason(&e),
                },
                true,
            ),
            Ok(Ok(response)) => {
                let replaceable = !is_final_refusal(&response);
                match on_reply(node, response) {
                    Ok(()) => (ReplicaAnswer::Ok { latency_us }, false),
                    Err(reason) => (ReplicaAnswer::Error { latency_us, reason }, replaceable),
                }
            }
        }
    }

    /// After a write's quorum: a replica that then fails (or never answers
    /// by the deadline) still gets a stand-in holding a hint, so a node that
    /// died before anyone noticed still receives the write by handoff. When
    /// no fallback is left for the slot of an owner held back (believed
    /// down), that owner is sent the write itself. Runs
    /// in a task that ends once the write's last send has answered (at the
    /// deadline at most) and its hints are placed: fallbacks are tried in
    /// turn, each for at most [`LATE_HINT_TIMEOUT`], and all of it ends
    /// [`LATE_HINT_TIMEOUT`] after the deadline at the latest (a partition
    /// not yet detected could otherwise make one write try every fallback
    /// for every failed slot, one after another); or at [`Self::close`]. At most
    /// [`LATE_HINT_TASKS_MAX`] such tasks run at once; past that a write
    /// skips them (counted), leaving the replica to read repair.
    fn hint_late_failures(
        &self,
        mut late: LateReplies,
        mut tracker: QuorumTracker,
        unused: Unused,
        key: Vec<u8>,
        clock: Clock,
        deadline: Instant,
    ) {
        let Ok(permit) = self.late_hint_tasks.clone().try_acquire_owned() else {
            counter!("ringkv_late_hint_tasks_skipped_total").increment(1);
            return;
        };
        let transport = self.transport.clone();
        let detector = self.detector.clone();
        let Unused {
            mut candidates,
            mut held_back,
        } = unused;
        self.spawn_detached(async move {
            let _permit = permit;
            let _ = tokio::time::timeout_at(deadline + LATE_HINT_TIMEOUT, async move {
                while let Some((node, result, latency_us)) = late.recv().await {
                    if let (Some(detector), Some(alive)) =
                        (&detector, result.as_ref().ok().and_then(health_of))
                    {
                        detector.record(&node, alive, Instant::now());
                    }
                    let (answer, replaceable) = match &result {
                        Ok(Ok(Response::Clock(_))) => (ReplicaAnswer::Ok { latency_us }, false),
                        Ok(Ok(response @ Response::Error(e))) => (
                            ReplicaAnswer::Error {
                                latency_us,
                                reason: e.message.clone(),
                            },
                            !is_final_refusal(response),
                        ),
                        Ok(Ok(other)) => (
                            ReplicaAnswer::Error {
                                latency_us,
                                reason: format!("unexpected reply {other:?}"),
                            },
                            true,
                        ),
                        Err(_) | Ok(Err(_)) => (
                            ReplicaAnswer::Error {
                                latency_us,
                                reason: "failed after the quorum".to_string(),
                            },
                            true,
                        ),
                    };
                    let owner = tracker.owner_of(&node).cloned();
                    if let (true, Some(owner)) = (replaceable, owner) {
                        if tracker.slot_uncovered_without(&owner, &node, true) {
                            let hint = Request::Replica(ReplicaRequest::Hint {
                                owner: owner.clone(),
                                key: key.clone(),
                                clock: clock.clone(),
                            });
                            while let Some(candidate) = candidates.pop_front() {
                                if !tracker.add_stand_in(&owner, candidate.clone()) {
                                    continue;
                                }
                                counter!("ringkv_late_stand_ins_total").increment(1);
                                let sent = tokio::time::timeout(
                                    LATE_HINT_TIMEOUT,
                                    transport.call(&candidate, hint.clone()),
                                )
                                .await;
                                if matches!(sent, Ok(Ok(Response::Clock(_)))) {
                                    tracker.record(&candidate, ReplicaAnswer::Ok { latency_us });
                                    break;
                                }
                                tracker.record(
                                    &candidate,
                                    ReplicaAnswer::Error {
                                        latency_us,
                                        reason: "late hint failed".to_string(),
                                    },
                                );
                            }
                            // No fallback left: the owner itself, if it was
                            // held back as believed down (the detector may be
                            // wrong).
                            if tracker.slot_uncovered_without(&owner, &node, true) {
                                if let Some(request) =
                                    take_held_back(&mut held_back, &owner, &mut tracker)
                                {
                                    counter!("ringkv_held_back_owners_asked_total").increment(1);
                                    let sent = tokio::time::timeout(
                                        LATE_HINT_TIMEOUT,
                                        transport.call(&owner, request),
                                    )
                                    .await;
                                    // Its answer tells the detector, as
                                    // any replica's does: it may be up.
                                    if let (Some(detector), Some(alive)) =
                                        (&detector, sent.as_ref().ok().and_then(health_of))
                                    {
                                        detector.record(&owner, alive, Instant::now());
                                    }
                                    let answer = match sent {
                                        Ok(Ok(Response::Clock(_))) => {
                                            ReplicaAnswer::Ok { latency_us }
                                        }
                                        _ => ReplicaAnswer::Error {
                                            latency_us,
                                            reason: "failed after the quorum".to_string(),
                                        },
                                    };
                                    tracker.record(&owner, answer);
                                }
                            }
                        }
                    }
                    tracker.record(&node, answer);
                }
            })
            .await;
        });
    }

    /// Hands a request to the first replica that answers.
    ///
    /// Each attempt but the last gets [`FORWARD_SHARE_PERCENT`] of the time
    /// left: most of it, as the replica asked is the one expected to
    /// coordinate (a slow quorum needs the client's time, not a third of
    /// it), and a replica that died unnoticed still leaves the rest to the
    /// next. One believed up whose later replicas are all believed down
    /// gets all of it: they are unlikely to take over. The forwarded request carries its share
    /// (less a margin) so the replica gives up before we do.
    async fn forward(&self, replicas: &[NodeId], request: Request, deadline: Instant) -> Response {
        match self.try_forward(replicas, request, deadline, false).await {
            Ok(response) => response,
            Err(failed) => failed.into_response(REPLICAS_TRIED),
        }
    }

    /// A request for a key this node does not replicate, routed by
    /// [`Self::outsider_route`]: handed to others (their answer), to be
    /// taken here in an owner's slot, or refused. `resend` makes the
    /// request as it goes to another node (marked forwarded).
    async fn as_outsider(
        &self,
        pref: &PreferenceList,
        strict: bool,
        forwarded: bool,
        resend: impl Fn() -> Request,
        deadline: Instant,
    ) -> Outsider {
        match self.outsider_route(pref, strict, forwarded) {
            OutsiderRoute::StandIn { owner, via, here } => {
                match self.pass_to_stand_ins(&via, here, &resend, deadline).await {
                    Some(response) => Outsider::Answered(response),
                    None => Outsider::StandIn(owner),
                }
            }
            OutsiderRoute::Forward { to } => {
                Outsider::Answered(self.forward(&to, resend(), deadline).await)
            }
            OutsiderRoute::Refuse => Outsider::Refused,
        }
    }

    /// Hands a request for a key whose owners all seem down to the
    /// stand-ins `via`, in turn (see [`Self::outsider_route`]). Returns the
    /// client's answer, or `None` when this node is to stand in itself:
    /// `here`, and every one of `via` refused the request (so none ran it).
    async fn pass_to_stand_ins(
        &self,
        via: &[NodeId],
        here: bool,
        request: impl FnOnce() -> Request,
        deadline: Instant,
    ) -> Option<Response> {
        if via.is_empty() {
            debug_assert!(here, "outsider_route leaves no one to take it");
            return None;
        }
        match self.try_forward(via, request(), deadline, true).await {
            Ok(response) => Some(response),
            // Refused at the deadline: standing in now could only time out
            // after storing the write.
            Err(failed)
                if here
                    && failed.ran_nothing
                    && !failed.overloaded
                    && Instant::now() < deadline =>
            {
                // A leave begun while the others were asked: its hand-over
                // may have checked for hints already.
                self.is_leaving().then(|| {
                    Response::error(
                        ErrorKind::NotServing,
                        format!(
                            "{} began to leave the cluster and stands in for no one; ask another node",
                            self.id
                        ),
                    )
                })
            }
            Err(failed) => Some(failed.into_response(STAND_INS_TRIED)),
        }
    }

    /// [`Self::forward`]'s attempts: the answer of the first of `nodes` that
    /// took the request, or what each said. With `only_refusals` (stand-ins,
    /// after which this node may take the request itself), the next node is
    /// tried only after one that refused it (it ran nothing), and each gets
    /// all the time left: one that failed or stayed silent may have stored
    /// a write, and a read through this node would not see that copy, so
    /// nothing more is tried.
    async fn try_forward(
        &self,
        nodes: &[NodeId],
        mut request: Request,
        deadline: Instant,
        only_refusals: bool,
    ) -> Result<Response, ForwardFailed> {
        let mut failures = Vec::new();
        // Whether every replica asked ran nothing, and one of them for want
        // of memory: then the client is told so, and may retry later.
        let (mut ran_nothing, mut overloaded) = (true, false);
        // Nodes believed down go last (stable: ring order otherwise).
        let mut replicas = nodes.to_vec();
        replicas.sort_by_key(|n| !self.is_healthy(n));
        for (i, node) in replicas.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                failures.push(format!("{node} (no time left)"));
                ran_nothing = false;
                continue;
            }
            let left = deadline - now;
            // The last replica gets what is left. Before it, only one
            // believed up gets all of it: when all are believed down (the
            // forwarder's own view may be what failed), the split stands.
            let later = &replicas[i + 1..];
            let last_hope = only_refusals
                || later.is_empty()
                || (self.is_healthy(node) && later.iter().all(|n| !self.is_healthy(n)));
            let share = if last_hope {
                left
            } else {
                left * FORWARD_SHARE_PERCENT / 100
            };
            let attempt_deadline = now + share;
            let remaining_ms = share
                .saturating_sub(self.forward_margin(node, share))
                .as_millis()
                .max(1);
            let remaining_ms = remaining_ms.min(u128::from(u32::MAX)) as u32;
            set_timeout_ms(&mut request, remaining_ms);
            if let (Request::Put(put), Some(clock)) = (&mut request, &self.wall_clock) {
                put.not_after_unix_ms = Some(clock() + u64::from(remaining_ms));
            }
            match self.call(node, request.clone(), attempt_deadline).await {
                // Nothing ran there: the next replica may take it.
                Ok(Response::Error(e))
                    if matches!(e.kind, ErrorKind::NotServing | ErrorKind::Overloaded) =>
                {
                    overloaded |= e.kind == ErrorKind::Overloaded;
                    failures.push(format!("{node} ({})", e.message));
                    // A stand-in shedding load is still the first one up:
                    // reads through any node go to it, so one that stood
                    // in after it would put the write where they do not
                    // look. The client retries later instead.
                    if only_refusals && e.kind == ErrorKind::Overloaded {
                        break;
                    }
                }
                Ok(response) => return Ok(response),
                Err(reason) => {
                    ran_nothing = false;
                    failures.push(format!("{node} ({reason})"));
                    if only_refusals {
                        break;
                    }
                }
            }
        }
        Err(ForwardFailed {
            failures,
            ran_nothing,
            overloaded,
        })
    }

    /// How much of a forward's `share` of the time the replica does not
    /// get: room for its answer to come back before this node gives up on
    /// it. An answer later than that (the replica used its whole deadline,
    /// say for a quorum it could not reach) would be taken for silence, and
    /// the next replica would store the write again. So the margin covers
    /// a round trip: the peer's measured latency when known, and at least a
    /// quarter of the share (an emulated or distant region), but no more
    /// than half of it.
    fn forward_margin(&self, node: &NodeId, share: Duration) -> Duration {
        let measured = self
            .latency
            .average_us(node)
            .map_or(Duration::ZERO, |us| Duration::from_micros(us as u64));
        FORWARD_MARGIN
            .max(share / 4)
            .max(measured + FORWARD_MARGIN)
            .min(share / 2)
    }

    async fn call(
        &self,
        node: &NodeId,
        request: Request,
        deadline: Instant,
    ) -> Result<Response, String> {
        match tokio::time::timeout_at(deadline, self.transport.call(node, request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(transport_reason(&e)),
            Err(_) => Err("timed out".to_string()),
        }
    }
}

/// Where a request for a key the coordinator does not replicate goes
/// (see [`Coordinator::outsider_route`]).
#[derive(Debug)]
enum OutsiderRoute {
    /// Coordinated in `owner`'s slot, on the coordinator's hint for it, by
    /// the first of `via` that takes it, or else (if `here`) by this node.
    StandIn {
        owner: NodeId,
        via: Vec<NodeId>,
        here: bool,
    },
    /// Forwarded to the first of `to` that answers.
    Forward { to: Vec<NodeId> },
    /// A forwarded request this node neither stands in for nor sends on.
    Refuse,
}

/// What became of a request routed by [`Coordinator::as_outsider`].
enum Outsider {
    /// Another node took it, or it failed: the client's answer.
    Answered(Response),
    /// This node takes it, in this owner's slot.
    StandIn(NodeId),
    /// A forwarded request this node neither stands in for nor sends on.
    Refused,
}

/// How the error of a forward that no node took names those it tried.
const REPLICAS_TRIED: &str = "replica of this key";
const STAND_INS_TRIED: &str = "stand-in for this key's replicas (all believed down)";

/// Gives `owner`'s slot to `me`, the coordinator standing in for it; the
/// owner, believed down, is held back (not asked).
fn take_slot_of(tracker: &mut QuorumTracker, owner: &NodeId, me: &NodeId) {
    tracker.add_stand_in(owner, me.clone());
    tracker.hold_back(owner);
}

/// Why no node a request was forwarded to took it.
struct ForwardFailed {
    /// Each node tried, with what it said.
    failures: Vec<String>,
    /// Whether every node tried ran nothing, and one of them for want of
    /// memory: then the client is told so, and may retry later.
    ran_nothing: bool,
    overloaded: bool,
}

impl ForwardFailed {
    /// The client's error; `tried` names the nodes tried ("replica of
    /// this key").
    fn into_response(self, tried: &str) -> Response {
        counter!("ringkv_forward_failures_total").increment(1);
        let kind = if self.ran_nothing && self.overloaded {
            ErrorKind::Overloaded
        } else {
            ErrorKind::Unavailable
        };
        Response::error(
            kind,
            format!(
                "no {tried} could be reached to coordinate it: {}",
                self.failures.join(", ")
            ),
        )
    }
}

/// What a quorum read found, for read repair.
struct ReadOutcome {
    key: Vec<u8>,
    /// The preference list: only these are judged and repaired.
    owners: Vec<NodeId>,
    merged: Clock,
    replies: Vec<(NodeId, Option<Clock>)>,
}

/// Waits (until `until` at most) for the read answers still to come, then
/// decides which replicas need the merged clock.
async fn collect_repair(mut read: ReadOutcome, mut late: LateReplies, until: Instant) -> RepairJob {
    while let Ok(Some(message)) = tokio::time::timeout_at(until, late.recv()).await {
        read.absorb(message);
    }
    read.into_job()
}

impl ReadOutcome {
    /// Adds a late answer to what the read found.
    fn absorb(&mut self, (node, result, _): LateReply) {
        if let Ok(Ok(Response::Clock(clock))) = result {
            if let Some(clock) = &clock {
                self.merged.sync(clock);
            }
            if self.owners.contains(&node) {
                self.replies.push((node, clock));
            }
        }
    }

    /// The replicas found stale, and the merged clock they need.
    fn into_job(self) -> RepairJob {
        let targets = stale_replicas(&self.merged, &self.replies);
        RepairJob {
            key: self.key,
            clock: self.merged,
            targets,
        }
    }
}

/// The fallbacks a fan-out may still use, and what to send them.
struct StandIns<'a> {
    /// Fallbacks believed up and not yet used, in ring order.
    candidates: VecDeque<NodeId>,
    /// The request a stand-in for an owner gets; `None` when stand-ins are
    /// not allowed (`--strict`, or writes with `--no-hints`).
    request_for: Option<&'a (dyn Fn(&NodeId) -> Request + Sync)>,
    /// Whether owners silent until `after` get a stand-in (writes) or are
    /// waited for (reads).
    replace_silent: bool,
    /// When owners that have not answered at all get a stand-in too
    /// (writes), or a read still short of R asks its remaining spares,
    /// those believed down through stand-ins.
    after: Instant,
    /// Owners not asked at first (reads), with their request: asked when an
    /// asked one fails, at `speculate_at` (once; `None` for writes; only
    /// those believed up) when answers are still missing, and at `after`.
    spares: VecDeque<(NodeId, Request)>,
    speculate_at: Option<Instant>,
    /// Owners believed down that got a stand-in instead, with their own
    /// request: asked after all when their last stand-in fails or stays
    /// silent (see [`Coordinator::fan_out`]).
    held_back: HeldBack,
}

impl StandIns<'_> {
    /// Whether an owner believed down would be read through a stand-in
    /// (stand-ins are allowed and one is left) rather than asked itself.
    fn would_stand_in(&self) -> bool {
        self.request_for.is_some() && !self.candidates.is_empty()
    }

    /// The next fallback for `owner`, registered with `tracker`, and its request.
    fn next_for(
        &mut self,
        owner: &NodeId,
        tracker: &mut QuorumTracker,
    ) -> Option<(NodeId, Request)> {
        let request_for = self.request_for?;
        while let Some(candidate) = self.candidates.pop_front() {
            if tracker.add_stand_in(owner, candidate.clone()) {
                return Some((candidate, request_for(owner)));
            }
        }
        None
    }

    /// `owner`'s own request, if it was held back and the tracker agrees to
    /// ask it now (its slot is still open).
    fn ask_held_back(&mut self, owner: &NodeId, tracker: &mut QuorumTracker) -> Option<Request> {
        take_held_back(&mut self.held_back, owner, tracker)
    }
}

/// Owners believed down that got a stand-in instead, with their own request.
type HeldBack = Vec<(NodeId, Request)>;

/// If `node` was just sent as the stand-in of an owner held back, that
/// owner and when to ask it after all should `node` stay silent: `wait`
/// from now.
fn held_back_check(
    node: &NodeId,
    stand_ins: &StandIns<'_>,
    tracker: &QuorumTracker,
    wait: Duration,
) -> Option<(NodeId, Instant)> {
    let owner = tracker.owner_of(node).filter(|owner| *owner != node)?;
    stand_ins
        .held_back
        .iter()
        .any(|(held, _)| held == owner)
        .then(|| (owner.clone(), Instant::now() + wait))
}

/// What a fan-out left unused, for the stand-ins after a write's answer.
struct Unused {
    /// Fallbacks believed up, not yet used.
    candidates: VecDeque<NodeId>,
    /// Owners held back and not asked.
    held_back: HeldBack,
}

/// Takes `owner`'s request out of `held_back` if the tracker agrees to ask
/// it now (it was held back, and its slot is still open).
fn take_held_back(
    held_back: &mut HeldBack,
    owner: &NodeId,
    tracker: &mut QuorumTracker,
) -> Option<Request> {
    let at = held_back.iter().position(|(o, _)| o == owner)?;
    if !tracker.ask_held_back(owner) {
        return None;
    }
    Some(held_back.swap_remove(at).1)
}

/// When a replica that has not answered at all gets a stand-in: a quarter
/// of the request's time, at most [`STAND_IN_AFTER_MAX`].
fn stand_in_after(start: Instant, deadline: Instant) -> Instant {
    start + ((deadline - start) / 4).min(STAND_IN_AFTER_MAX)
}

/// The longest a coordinator waits for a silent replica before also asking
/// a fallback; a node down but not yet detected costs at most this much.
const STAND_IN_AFTER_MAX: Duration = Duration::from_millis(500);

/// How long a hint sent after a write's quorum may take.
const LATE_HINT_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes whose late answers may be watched at once for late hints.
const LATE_HINT_TASKS_MAX: usize = 1024;

/// How long a fan-out whose quorum is out of reach still records the
/// answers on their way, for the error's receipt.
const FAILED_SETTLE: Duration = Duration::from_millis(250);

/// How long a read keeps listening for answers after its quorum, so that
/// slower replicas can be judged for read repair.
const REPAIR_COLLECT_GRACE: Duration = Duration::from_millis(500);

/// Time kept back from a forwarded request's deadline so its answer (even a
/// quorum error) can travel back before the forwarder gives up.
const FORWARD_MARGIN: Duration = Duration::from_millis(20);

/// The share of the time left that a forward gives a replica when others
/// could still take over (see `Coordinator::forward`): twice what an equal
/// split among three gave the first, and a third left for the rest.
const FORWARD_SHARE_PERCENT: u32 = 67;

impl<T: Transport> Coordinator<T> {
    /// The refusal of a forwarded write that came after the time its
    /// forwarder gave it to begin (`not_after_unix_ms`, plus the clocks'
    /// allowance). The forwarder may have had another replica mint it since, acknowledged it, and the client may
    /// have deleted it with a read's context; minting it again here would
    /// bring the value back. Nothing runs: the answer, if it arrives, tells
    /// the forwarder so. Not covered: a mint that began in time and whose
    /// write then took past the date (a RocksDB write stall) still stores
    /// the write twice, as before this check.
    fn past_its_forward(&self, request: &PutRequest) -> Option<Response> {
        let (not_after, clock) = (request.not_after_unix_ms?, self.wall_clock.as_ref()?);
        let now = clock();
        if now <= not_after.saturating_add(FORWARD_CLOCK_SKEW_MS) {
            return None;
        }
        counter!("ringkv_forwards_refused_late_total").increment(1);
        Some(Response::error(
            ErrorKind::NotServing,
            format!(
                "{} received this forwarded write {} ms after the time its forwarder gave it to begin \
                 (by the two nodes' wall clocks; if they are that far apart, sync them); \
                 it was not run here",
                self.id,
                now - not_after
            ),
        ))
    }
}

/// How far past a forward's `not_after_unix_ms` a replica still takes it:
/// the two nodes' wall clocks may disagree by that much. A coordinator
/// whose clock is behind by more than the forward's share of the deadline
/// plus this would have every forward it makes refused; one ahead lets a
/// forward that late be minted after all.
const FORWARD_CLOCK_SKEW_MS: u64 = 250;

fn set_timeout_ms(request: &mut Request, timeout_ms: u32) {
    match request {
        Request::Put(p) => p.timeout_ms = timeout_ms,
        Request::Get(g) => g.timeout_ms = timeout_ms,
        _ => {}
    }
}

fn deadline(start: Instant, timeout_ms: u32) -> Result<Instant, Response> {
    if timeout_ms == 0 || timeout_ms > REQUEST_TIMEOUT_MS_MAX {
        return Err(invalid(format!(
            "timeout of {timeout_ms} ms is out of range; use 1..={REQUEST_TIMEOUT_MS_MAX}"
        )));
    }
    Ok(start + Duration::from_millis(u64::from(timeout_ms)))
}

fn elapsed_us(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

fn transport_reason(e: &TransportError) -> String {
    match e {
        TransportError::Unreachable { reason, .. } => format!("unreachable: {reason}"),
        TransportError::UnknownNode { .. } => "not a known member".to_string(),
        TransportError::Protocol { reason, .. } => format!("protocol error: {reason}"),
    }
}

/// Why a write's sloppy quorum could not use stand-ins at all, for its
/// failure message; `None` when it could (they failed or were used up).
fn no_stand_in(strict: bool, hinted_handoff: bool, pref: &PreferenceList) -> Option<&'static str> {
    if strict {
        Some("--strict counts only the key's own replicas")
    } else if !hinted_handoff {
        Some("this node runs with --no-hints")
    } else if pref.fallbacks.is_empty() {
        Some("every member holds a replica of this key (stand-ins need more members than N)")
    } else {
        None
    }
}

/// An error if the cluster has fewer members than `required` replicas: with
/// fewer members than N every member is a replica and none is a fallback,
/// so no quorum of that size can form. Said before anything is sent, so a
/// write that cannot succeed is not stored on the members there are.
fn too_few_members(
    which: &str,
    required: usize,
    pref: &PreferenceList,
    nothing_done: &str,
) -> Option<Response> {
    // Exact whenever it matters: a key's fallbacks are every other member
    // up to at least N of them, and `required` is at most N.
    let members = pref.replicas.len() + pref.fallbacks.len();
    (required > members).then(|| {
        unavailable(format!(
            "{which}={required} needs {required} replicas, but the cluster has only {members} \
             member{}; {nothing_done}",
            if members == 1 { "" } else { "s" }
        ))
    })
}

/// A refusal of the request itself: a stand-in would refuse it too, so it
/// is not worth asking one. Not a node that could not decode it (another
/// version, or a broken stream): a stand-in may well read it.
fn is_final_refusal(response: &Response) -> bool {
    matches!(response, Response::Error(e)
        if e.kind == ErrorKind::InvalidRequest && !e.message.starts_with(MALFORMED_REQUEST))
}

fn reply_error(response: Response) -> String {
    match response {
        Response::Error(e) => e.message,
        other => format!("unexpected reply {other:?}"),
    }
}

fn invalid(message: impl Into<String>) -> Response {
    Response::error(ErrorKind::InvalidRequest, message)
}

fn unavailable(message: impl Into<String>) -> Response {
    Response::error(ErrorKind::Unavailable, message)
}

fn internal(message: impl Into<String>) -> Response {
    Response::error(ErrorKind::Internal, message)
}

fn record_metrics(op: &'static str, response: &Response, start: Instant) {
    let result = match response {
        Response::Error(e) => match e.kind {
            ErrorKind::QuorumNotReached => "quorum_failed",
            ErrorKind::InvalidRequest => "invalid",
            _ => "error",
        },
        _ => "ok",
    };
    counter!("ringkv_requests_total", "op" => op, "result" => result).increment(1);
    histogram!("ringkv_request_seconds", "op" => op).record(start.elapsed().as_secs_f64());
}

/// What a replica's answer says of its health to the failure detector:
/// alive for any answer, even an error reply; failed for a transport
/// failure. Nothing for `NotServing`: the process runs but does not serve
/// (a draining node refuses pings so that peers count it down, and its
/// every refusal must not count it up again), and the probes judge it.
fn health_of(outcome: &Result<Response, TransportError>) -> Option<bool> {
    match outcome {
        Ok(Response::Error(e)) if e.kind == ErrorKind::NotServing => None,
        Ok(_) => Some(true),
        Err(_) => Some(false),
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_core::TransportError;

    /// A stand-in would refuse what the owner refused as invalid, but may
    /// read what the owner could not decode.
    #[test]
    fn a_request_the_node_could_not_decode_is_no_final_refusal() {
        let refusal = |message: String| Response::error(ErrorKind::InvalidRequest, message);
        assert!(is_final_refusal(&refusal(
            "invalid request: key is empty".into()
        )));
        assert!(!is_final_refusal(&refusal(format!(
            "{MALFORMED_REQUEST}: unknown variant"
        ))));
        assert!(!is_final_refusal(&Response::error(
            ErrorKind::Overloaded,
            "shedding"
        )));
    }

    /// A network that reaches nobody: this test sends nothing.
    struct NoNetwork;

    impl Transport for NoNetwork {
        async fn call(&self, to: &NodeId, _request: Request) -> Result<Response, TransportError> {
            Err(TransportError::UnknownNode { node: to.clone() })
        }
    }

    fn ring(members: &[&str]) -> Arc<Ring> {
        let members = members.iter().map(|m| (NodeId::new(*m).unwrap(), 8));
        Arc::new(Ring::new(members, 3).unwrap())
    }

    #[test]
    fn a_new_ring_forgets_the_latency_of_nodes_that_left() {
        let id = |s: &str| NodeId::new(s).unwrap();
        let coordinator = Coordinator::new(
            id("a"),
            1,
            ring(&["a", "b", "c"]),
            Arc::new(NoNetwork),
            CoordinatorConfig::default(),
        );
        coordinator.latency.record(&id("b"), 100);
        coordinator.latency.record(&id("c"), 200);
        coordinator.set_ring(ring(&["a", "b", "d"]));
        assert_eq!(coordinator.latency.average_us(&id("b")), Some(100.0));
        assert_eq!(coordinator.latency.average_us(&id("c")), None, "c left");
    }

    /// Who coordinates a request for a key this node does not replicate,
    /// when it believes every owner down: the first fallback it believes up
    /// that takes it, or itself; never itself while it leaves, and never
    /// without a detector's word, for a strict request or with hints off.
    #[tokio::test(start_paused = true)]
    async fn an_outsider_stands_in_only_when_it_may_and_after_those_before_it() {
        let ring = ring(&["a", "b", "c", "d", "e", "f"]);
        let pref = ring.preference_list(b"k");
        let (before, me, after) = (
            pref.fallbacks[0].clone(),
            pref.fallbacks[1].clone(),
            pref.fallbacks[2].clone(),
        );
        let make = |config: CoordinatorConfig| {
            Coordinator::new(me.clone(), 1, ring.clone(), Arc::new(NoNetwork), config)
        };
        let detector = Arc::new(FailureDetector::new(Default::default()));
        let leaving = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = make(CoordinatorConfig::default())
            .with_failure_detector(detector.clone())
            .with_leaving_flag(leaving.clone());
        let route = |c: &Coordinator<NoNetwork>, strict: bool, forwarded: bool| match c
            .outsider_route(&pref, strict, forwarded)
        {
            OutsiderRoute::StandIn { owner, via, here } => {
                format!("stand in for {owner} via {via:?}, here {here}")
            }
            OutsiderRoute::Forward { to } => format!("forward to {to:?}"),
            OutsiderRoute::Refuse => "refuse".into(),
        };
        let owners = format!("forward to {:?}", pref.replicas);
        assert_eq!(route(&c, false, false), owners, "owners believed up");
        assert_eq!(route(&c, false, true), "refuse");
        let down = |n: &NodeId| {
            let now = Instant::now();
            detector.record(n, false, now);
            detector.record(n, false, now);
            assert!(!detector.is_up(n));
        };
        pref.replicas.iter().for_each(down);
        let first = &pref.replicas[0];
        assert_eq!(
            route(&c, false, false),
            format!("stand in for {first} via [{before:?}], here true")
        );
        let alone = format!("stand in for {first} via [], here true");
        assert_eq!(route(&c, false, true), alone, "the forwarder chose it");
        assert_eq!(route(&c, true, false), owners, "strict");
        leaving.store(true, Ordering::SeqCst);
        assert_eq!(
            route(&c, false, false),
            format!("stand in for {first} via [{before:?}, {after:?}], here false"),
            "leaving: every other fallback believed up"
        );
        assert_eq!(route(&c, false, true), "refuse", "leaving");
        down(&before);
        down(&after);
        assert_eq!(
            route(&c, false, false),
            owners,
            "leaving, no one to take it"
        );
        leaving.store(false, Ordering::SeqCst);
        assert_eq!(route(&c, false, false), alone);
        let no_hints = make(CoordinatorConfig {
            hinted_handoff: false,
            ..CoordinatorConfig::default()
        })
        .with_failure_detector(detector.clone());
        assert_eq!(route(&no_hints, false, false), owners, "--no-hints");
        let no_detector = make(CoordinatorConfig::default());
        assert_eq!(route(&no_detector, false, false), owners, "no detector");
    }

    /// On a ring larger than N plus the fallbacks a preference list names,
    /// a node past them never stands in, even when every fallback refuses:
    /// other nodes' gets would not look for its hint. It only forwards.
    #[tokio::test(start_paused = true)]
    async fn a_node_past_the_keys_fallbacks_never_stands_in() {
        let names: Vec<String> = (0..40).map(|i| format!("n{i:02}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let ring = ring(&names);
        let pref = ring.preference_list(b"k");
        let me = ring
            .nodes()
            .into_iter()
            .find(|n| !pref.replicas.contains(n) && !pref.fallbacks.contains(n))
            .expect("a node past the fallbacks");
        let detector = Arc::new(FailureDetector::new(Default::default()));
        let c = Coordinator::new(
            me,
            1,
            ring.clone(),
            Arc::new(NoNetwork),
            CoordinatorConfig::default(),
        )
        .with_failure_detector(detector.clone());
        for owner in &pref.replicas {
            let now = Instant::now();
            detector.record(owner, false, now);
            detector.record(owner, false, now);
        }
        match c.outsider_route(&pref, false, false) {
            OutsiderRoute::StandIn { via, here, .. } => {
                assert!(!here);
                assert_eq!(via, pref.fallbacks, "every fallback, in ring order");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.outsider_route(&pref, false, true),
            OutsiderRoute::Refuse
        ));
    }

    /// A stand-in before this node that refuses, answering while this
    /// node's leave begins.
    struct RefusesAsTheLeaveBegins(Arc<std::sync::atomic::AtomicBool>);

    impl Transport for RefusesAsTheLeaveBegins {
        async fn call(&self, _to: &NodeId, _request: Request) -> Result<Response, TransportError> {
            self.0.store(true, Ordering::SeqCst);
            Ok(Response::error(
                ErrorKind::NotServing,
                "it sees an owner up",
            ))
        }
    }

    /// A node whose leave began while the stand-ins before it were asked
    /// does not stand in once they refuse: the leave's hand-over may have
    /// checked for hints already, and this one would leave with the node.
    /// Before the leave, the same refusals let it stand in.
    #[tokio::test(start_paused = true)]
    async fn a_node_that_began_to_leave_meanwhile_does_not_stand_in() {
        let ring = ring(&["a", "b", "c", "d", "e", "f"]);
        let pref = ring.preference_list(b"k");
        let (before, me) = (pref.fallbacks[0].clone(), pref.fallbacks[1].clone());
        let leaving = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = Coordinator::new(
            me,
            1,
            ring.clone(),
            Arc::new(RefusesAsTheLeaveBegins(leaving.clone())),
            CoordinatorConfig::default(),
        )
        .with_leaving_flag(leaving.clone());
        let deadline = Instant::now() + Duration::from_secs(2);
        let ask = || Request::Ping;
        let answer = c
            .pass_to_stand_ins(std::slice::from_ref(&before), true, ask, deadline)
            .await;
        assert!(
            matches!(&answer, Some(Response::Error(e)) if e.kind == ErrorKind::NotServing
                && e.message.contains("began to leave")),
            "{answer:?}"
        );
        let c = Coordinator::new(
            pref.fallbacks[1].clone(),
            1,
            ring,
            Arc::new(RefusesAsTheLeaveBegins(Arc::default())),
            CoordinatorConfig::default(),
        )
        .with_leaving_flag(Arc::default());
        let answer = c
            .pass_to_stand_ins(std::slice::from_ref(&before), true, ask, deadline)
            .await;
        assert!(answer.is_none(), "stands in: {answer:?}");
    }
}
