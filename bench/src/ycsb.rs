//! The YCSB run: load `records` keys, then for each consistency setting run
//! the workload's operation mix for a while and measure latency per
//! operation type, errors, timeouts, siblings and staleness.
//!
//! **Clients.** `concurrency` clients spread round-robin over the targets.
//! They share `connections_per_target` QUIC connections to each target, as
//! the users of one client driver share its connection pool, so requests of
//! concurrent clients leave in the same packets (RESP clients each have a
//! TCP connection of their own). Each connection is a `ClusterClient`
//! preferring its target: while that target cannot serve (stopped,
//! draining, silent) it moves to the next, and the report counts the moves. In a closed loop a client sends its next
//! request when the last is answered. In an open loop (`rate_per_s`)
//! requests come due on a fixed schedule ([`crate::pacer`]) and a free
//! client takes the next; a request's latency counts from when it was due,
//! so a stall shows up in every request queued behind it instead of hiding
//! as fewer requests (coordinated omission). With emulated regions, a client
//! sits in its coordinator's region, and the latency matrix's local delay
//! applies to its calls; nodes delay their calls to each other themselves
//! (`ringkv node --latency-matrix`).
//!
//! **Updates.** A blind write in ringkv adds a sibling, so YCSB's updates
//! (which do not read first) would pile up siblings on hot keys without end.
//! By default ([`UpdateMode::Overwrite`]) updates and inserts are
//! overwrites: they supersede whatever the coordinating replica holds, as
//! `SET` does in Redis or a write in Cassandra; only writes coordinated
//! concurrently by different nodes become siblings. With
//! [`UpdateMode::Context`], each client remembers the context of the last
//! version it saw of a key (from a read or its own write) and writes with it,
//! as an application using siblings would; concurrent updates from clients
//! that have not seen each other's writes then stay siblings until a read
//! and a write resolve them. Read-modify-write (workload F) always writes
//! with the context of its own read.
//!
//! **Staleness (PBS, Bailis et al., "Probabilistically Bounded Staleness
//! for Practical Partial Quorums", VLDB 2012).** Besides the clients, a few
//! probers (at once, for more samples) each write a fresh value through one
//! coordinator, wait `t` after the acknowledgement, and read through
//! *another* coordinator with the setting's R. The read is fresh if it
//! returns the value just written (or a newer one: there is none, each
//! probe key is written once). A node that holds no copy of a key passes
//! the request on to the first replica that does, so the two addresses may
//! still reach one coordinator; the receipts tell, and such a probe is left
//! out (`same_coordinator`): it would always be fresh. Prober `k` writes
//! through target `k` and reads through target `k + 1` (of the first
//! `probers` + 1, round the list; with more probers than targets, several
//! share a pair), so the curve spans several pairs of coordinators (in
//! the embedded cluster, of regions), not one link. The share of fresh
//! reads per `t` is the t-visibility curve. The wait is `link_delay`'s, about 0.1 ms late on
//! this VM (tokio's timer fires on whole milliseconds, which made each
//! t > 0 about a millisecond longer); the JSON gives the mean measured wait
//! of each t (`mean_gap_ms`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use ringkv_core::dvv::Payload;
use ringkv_core::wire::{
    ErrorKind, ErrorReply, GetRequest, Outcome as ReplicaAnswer, PutRequest, Request, Response,
};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{CallError, ClusterClient, ClusterKey};

use crate::direct::DirectReads;
use crate::machine_cpu::{MachineReading, MachineShare};
use crate::pacer::{self, Pacer};
use crate::predict::OpPrediction;
use crate::resp::RespConn;
use crate::workload::{record_key, KeyChooser, KeyDistribution, Op, Workload};
use crate::{new_histogram, record_latency, BenchError};

/// The waits after a write's acknowledgement at which staleness is probed, in ms.
pub const STALENESS_T_MS: &[u64] = &[0, 1, 5, 10, 50, 100];

/// One R/W choice to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub r: Consistency,
    pub w: Consistency,
    /// A RESP target's single setting (shown as `resp`).
    pub resp: bool,
}

impl Setting {
    /// The one "setting" of a RESP target, which has no R or W.
    pub const RESP: Setting = Setting {
        r: Consistency::One,
        w: Consistency::One,
        resp: true,
    };
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.resp {
            return write!(f, "resp");
        }
        if self.r == self.w {
            write!(f, "{}", self.r)
        } else {
            write!(f, "r={},w={}", self.r, self.w)
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct YcsbConfig {
    pub targets: Vec<SocketAddr>,
    pub workload: Workload,
    pub records: u64,
    pub value_bytes: usize,
    pub concurrency: usize,
    /// QUIC connections to each target that the clients share, as a client
    /// driver's pool would (requests from many clients then share packets).
    /// At `concurrency` or more, each client has a connection of its own.
    /// RESP clients always have their own.
    pub connections_per_target: usize,
    /// How long each setting's run phase lasts, measured.
    pub duration: Duration,
    /// How long each setting's clients run before that, unmeasured:
    /// connections, caches and the store's memtables warm up, and the
    /// first requests' costs do not land in the latencies.
    pub warmup: Duration,
    pub settings: Vec<Setting>,
    pub request_timeout_ms: u32,
    pub seed: u64,
    /// Emulated delay each way between a client and its coordinator.
    pub client_delay: Duration,
    /// Prepended to every record key: one key space per run.
    pub key_prefix: String,
    /// Open loop: requests per second over all clients, on a fixed
    /// schedule whatever the answers' pace. `None`: closed loop.
    pub rate_per_s: Option<u64>,
    /// The target is a RESP server (`targets[0]`), not ringkv nodes:
    /// `GET`/`SET`, no contexts, no consistency settings, no staleness.
    pub resp: bool,
    /// How updates and inserts treat the values they replace.
    pub updates: UpdateMode,
    /// The cluster's key, if it has one (`--cluster-key-file`).
    pub cluster_key: Option<ClusterKey>,
    /// Overrides the workload's request distribution (YCSB's
    /// `requestdistribution`); `None`: the workload's own.
    pub distribution: Option<KeyDistribution>,
    /// Staleness probers running at once during each setting (see
    /// [`probe_with`]); 0 measures no staleness.
    pub probers: usize,
    /// Clients coordinate their reads themselves, asking the key's
    /// replicas at once (Dynamo §6.4; see [`crate::direct`]); writes still
    /// go through a coordinator. Needs ringkv nodes and no client delay.
    pub client_reads: bool,
}

/// How YCSB updates and inserts write (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateMode {
    /// Supersede every version at the coordinating replica.
    Overwrite,
    /// Write with the context of the last version this client saw.
    Context,
}

impl UpdateMode {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "overwrite" => Ok(UpdateMode::Overwrite),
            "context" => Ok(UpdateMode::Context),
            other => Err(format!(
                "unknown update mode {other:?}; use overwrite or context"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UpdateMode::Overwrite => "overwrite",
            UpdateMode::Context => "context",
        }
    }
}

/// Latencies and counts of one operation type.
#[derive(Debug, Clone)]
pub struct OpReport {
    pub ops: u64,
    pub errors: u64,
    pub timeouts: u64,
    /// Requests a node refused unrun, out of memory for requests
    /// (`ErrorKind::Overloaded`): not failures of the store, but work it
    /// declined, so they are counted apart from `errors`.
    pub shed: u64,
    /// Why the first failed request failed (of one client, when merged):
    /// the likeliest cause of the rest.
    pub first_error: Option<String>,
    /// Microseconds: successful operations, and timed-out ones at the time
    /// the client gave up (a lower bound, but the worst a user waited: left
    /// out, an overloaded store's percentiles would look better than its
    /// service). Failures the store answered are not in it.
    pub latency_us: Histogram<u64>,
    /// Microseconds: requests the store answered with a failure or shed,
    /// apart from `latency_us` as YCSB keeps its `-FAILED` series apart.
    /// In those percentiles a quick refusal would make the work done look
    /// faster, and left out altogether a slow failure (a quorum missed at
    /// the coordinator's deadline) would hide what its user waited.
    /// Created on the first failure: most runs have none, and each
    /// histogram is 136 KiB per client and operation type.
    pub failed_latency_us: Option<Histogram<u64>>,
}

impl OpReport {
    pub(crate) fn new() -> Self {
        OpReport {
            ops: 0,
            errors: 0,
            timeouts: 0,
            shed: 0,
            first_error: None,
            latency_us: new_histogram(),
            failed_latency_us: None,
        }
    }

    /// Requests made: answered, failed, timed out or shed.
    pub fn attempts(&self) -> u64 {
        self.ops + self.errors + self.timeouts + self.shed
    }

    /// Counts one request's `outcome`, which took `latency_us` from its
    /// (intended) start to the client's answer or giving up. Beyond the
    /// histogram's 60 s bound it is counted at the bound rather than losing
    /// the worst of the tail.
    pub(crate) fn count(&mut self, outcome: Outcome, latency_us: u64) {
        match outcome {
            Outcome::Read { .. } | Outcome::Written { .. } => {
                self.ops += 1;
                record_latency(&mut self.latency_us, latency_us, 1);
            }
            Outcome::Timeout => {
                self.timeouts += 1;
                record_latency(&mut self.latency_us, latency_us, 1);
            }
            Outcome::Shed => {
                self.shed += 1;
                self.count_failed(latency_us);
            }
            Outcome::Error { reason } => {
                self.errors += 1;
                self.first_error.get_or_insert(reason);
                self.count_failed(latency_us);
            }
        }
    }

    fn count_failed(&mut self, latency_us: u64) {
        let failed = self.failed_latency_us.get_or_insert_with(new_histogram);
        record_latency(failed, latency_us, 1);
    }

    pub(crate) fn merge(&mut self, other: &OpReport) {
        self.ops += other.ops;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.shed += other.shed;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        let _ = self.latency_us.add(&other.latency_us);
        if let Some(theirs) = &other.failed_latency_us {
            let ours = self.failed_latency_us.get_or_insert_with(new_histogram);
            let _ = ours.add(theirs);
        }
    }

    /// The `q` quantile (0..=1), in milliseconds; `None` with no latency
    /// recorded (every request failed or was shed).
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        crate::quantile_ms(&self.latency_us, q)
    }
}

/// What the staleness probers of one setting found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Probed {
    /// The t-visibility curve: one entry per [`STALENESS_T_MS`].
    pub visibility: Vec<Visibility>,
    /// Probers that ran until the end (all that were asked for, or the
    /// curve is an error).
    pub probers: usize,
}

/// Fresh reads out of probes at one `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Visibility {
    pub t_ms: u64,
    /// Probes whose write and read both succeeded.
    pub probes: u64,
    /// Of those, reads that saw the write.
    pub fresh: u64,
    /// Probes left out because the write or the read failed or timed out.
    pub failed: u64,
    /// Probes left out because one node coordinated both the write and the
    /// read: a node that holds no copy of a key passes a request on to the
    /// first replica that does, so the two coordinators may forward to the
    /// same one, which has the write by the time it acknowledged it.
    pub same_coordinator: u64,
    /// Microseconds from each probe's acknowledgement to its read's send,
    /// summed: at least `t_ms`, and more by the timer's lateness.
    pub gap_us: u64,
}

impl Visibility {
    /// The mean measured wait between acknowledgement and read, in ms.
    pub fn mean_gap_ms(&self) -> Option<f64> {
        (self.probes > 0).then(|| self.gap_us as f64 / 1000.0 / self.probes as f64)
    }

    /// The share of reads that saw the write (1 when nothing was probed).
    pub fn fresh_share(&self) -> f64 {
        if self.probes == 0 {
            1.0
        } else {
            self.fresh as f64 / self.probes as f64
        }
    }

    /// The 95% confidence interval of [`Self::fresh_share`] (Wilson's; see
    /// [`crate::share_interval`]), `None` when nothing was probed.
    pub fn fresh_interval95(&self) -> Option<(f64, f64)> {
        crate::share_interval::wilson_95(self.fresh, self.probes)
    }
}

/// What one client's reads returned.
#[derive(Debug, Clone, Copy, Default)]
struct ReadStats {
    reads: u64,
    /// Reads that found no value.
    not_found: u64,
    sibling_reads: u64,
    values: u64,
    max_values: u64,
}

impl ReadStats {
    fn record(&mut self, values: u64) {
        self.reads += 1;
        self.not_found += u64::from(values == 0);
        self.sibling_reads += u64::from(values > 1);
        self.values += values;
        self.max_values = self.max_values.max(values);
    }

    fn merge(&mut self, other: &ReadStats) {
        self.reads += other.reads;
        self.not_found += other.not_found;
        self.sibling_reads += other.sibling_reads;
        self.values += other.values;
        self.max_values = self.max_values.max(other.max_values);
    }
}

/// One setting's results.
#[derive(Debug, Clone)]
pub struct SettingReport {
    pub setting: Setting,
    /// What ops/s divides by: the measured window (closed loop), or the
    /// stretch over which the store answered the requests due in it (open
    /// loop; see `open_loop_elapsed`).
    pub elapsed: Duration,
    /// CPU time of this process during the run (see
    /// [`crate::process_cpu`]); `None` where it cannot be read.
    pub cpu: Option<Duration>,
    /// The whole machine's CPU time over the same stretch as `cpu` (from
    /// the end of the warm-up to the last answer, an open loop's drain
    /// included): how busy it was and how much the host took (see
    /// [`crate::machine_cpu`]); `None` where it cannot be read.
    pub machine: Option<MachineShare>,
    /// Open loop only: the requests a second that came due.
    pub rate_per_s: Option<u64>,
    /// With `--rate PERCENT%`: the closed loop of this setting run just
    /// before, of whose ops/s the rate is that share (see [`crate::rate`]),
    /// kept whole: its latencies are the store's at saturation, and its
    /// failures say whether the peak is capacity to plan on.
    pub peak: Option<Box<SettingReport>>,
    /// Open loop only: requests that came due but were never sent because
    /// every client was busy until the end, and then for a request timeout
    /// more (clients go on taking requests that came due before the end).
    /// They are counted as timeouts of the operations the mix would have
    /// drawn, at what they had waited when the clients stopped (a lower
    /// bound): left out, the requests queued longest would leave the
    /// percentiles. Any number here means the run fell far behind the
    /// rate: the store, or too few clients (see `mean_service_ms`).
    pub unsent: Option<u64>,
    /// Open loop only: the mean time from a client sending a request to
    /// its answer (or giving up), in ms. Each client has one request out at
    /// a time, so keeping up with a rate takes about rate × this many
    /// clients (Little's law; [`SettingReport::clients_needed`]); with
    /// fewer, requests wait for a free client, and that wait, which is the
    /// bench's and not the store's, counts in their latency.
    pub mean_service_ms: Option<f64>,
    /// Open loop only: how long the measured requests waited, from when
    /// they came due to when a client took them up (the pacer's lateness,
    /// a wait for a free client, a client task waiting for a thread). It
    /// is part of their latency; how much of it was the queue for a free
    /// client is [`SettingReport::client_queue_us`].
    pub pickup_us: Option<Histogram<u64>>,
    /// Open loop only: the part of each measured request's pickup spent
    /// queued because every client was busy with an earlier request (0 for
    /// a request a client was free for when it came due). With a fixed
    /// `--concurrency` that is mostly the store's slowness: answers that
    /// take more than clients ÷ rate, even for a moment, leave due
    /// requests waiting. It also holds the clients' own threads late to
    /// take answers up (a client is free once it has recorded its last
    /// request). The rest of the pickup is the load generator's lateness
    /// with a client free (the pacer's wake-ups, a free client waiting for
    /// a thread).
    pub client_queue_us: Option<Histogram<u64>>,
    pub ops: Vec<(Op, OpReport)>,
    pub reads: u64,
    /// Reads that found no value: every record is loaded, and an insert's
    /// record is read only once the insert is over, so these are records
    /// whose load or insert failed.
    pub reads_not_found: u64,
    /// Reads that returned more than one value.
    pub sibling_reads: u64,
    /// Values returned over all reads (siblings count one each).
    pub values_read: u64,
    /// The most values one read returned.
    pub max_siblings: u64,
    pub staleness: Vec<Visibility>,
    /// Staleness probers that ran (0 when staleness was not measured).
    pub probers: usize,
    /// Why staleness was not measured, if it was not.
    pub staleness_skipped: Option<String>,
    /// Records that exist after the run (the load's plus every insert).
    pub records_after: u64,
    /// Times a connection moved away to another node because its own could
    /// not take requests (stopped, draining, unreachable), as
    /// `ClusterClient::failovers` counts them; going back is not counted.
    pub failovers: u64,
    /// Each operation type's p50 as the latency matrix predicts it (see
    /// [`crate::predict`]), set by the caller that knows the matrix and the
    /// ring; empty otherwise.
    pub predicted_p50: Vec<OpPrediction>,
    /// With client-driven reads, how the measured reads went.
    pub client_reads: Option<ClientReadCounts>,
}

/// How a setting's client-driven reads went (see [`crate::direct`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientReadCounts {
    /// Reads the key's replicas answered alike, without a coordinator.
    pub direct: u64,
    /// Reads asked of a coordinator instead: replicas that disagreed (it
    /// repairs the stale ones it asks), refused or did not answer.
    pub fallbacks: u64,
}

impl ClientReadCounts {
    fn merge(&mut self, other: &ClientReadCounts) {
        self.direct += other.direct;
        self.fallbacks += other.fallbacks;
    }
}

#[cfg(test)]
impl SettingReport {
    /// A one-second run of the RESP setting that measured nothing but
    /// `ops`: each test sets the fields it checks.
    pub(crate) fn for_tests(ops: Vec<(Op, OpReport)>) -> Self {
        SettingReport {
            setting: Setting::RESP,
            elapsed: Duration::from_secs(1),
            cpu: None,
            machine: None,
            rate_per_s: None,
            peak: None,
            unsent: None,
            mean_service_ms: None,
            pickup_us: None,
            client_queue_us: None,
            ops,
            reads: 0,
            reads_not_found: 0,
            sibling_reads: 0,
            values_read: 0,
            max_siblings: 1,
            staleness: Vec::new(),
            probers: 0,
            staleness_skipped: None,
            records_after: 0,
            failovers: 0,
            predicted_p50: Vec::new(),
            client_reads: None,
        }
    }
}

impl SettingReport {
    pub fn total_ops(&self) -> u64 {
        self.ops.iter().map(|(_, r)| r.ops).sum()
    }

    pub fn ops_per_sec(&self) -> f64 {
        crate::per_second(self.total_ops(), self.elapsed)
    }

    /// One operation type's ops/s over the setting's window.
    pub fn op_ops_per_sec(&self, op: &OpReport) -> f64 {
        crate::per_second(op.ops, self.elapsed)
    }

    /// Open loop only: how many clients keeping up with its rate takes at
    /// the measured mean service time (see `mean_service_ms`).
    pub fn clients_needed(&self) -> Option<f64> {
        Some(self.rate_per_s? as f64 * self.mean_service_ms? / 1000.0)
    }

    /// Requests made in the run: answered, failed or timed out.
    pub fn attempts(&self) -> u64 {
        self.ops.iter().map(|(_, o)| o.attempts()).sum()
    }

    /// CPU microseconds of this process per operation that succeeded: what
    /// the work done cost. Divided by every attempt instead, a store that
    /// sheds or fails requests cheaply would look cheaper per operation the
    /// more it refused.
    pub fn cpu_us_per_op(&self) -> Option<f64> {
        per_op_us(self.cpu?, self.total_ops())
    }

    /// CPU microseconds of this process per request sent (answered, failed,
    /// shed or timed out; the open loop's requests never sent cost
    /// nothing): with [`SettingReport::cpu_us_per_op`], what the failures
    /// cost.
    pub fn cpu_us_per_attempt(&self) -> Option<f64> {
        let sent = self.attempts().saturating_sub(self.unsent.unwrap_or(0));
        per_op_us(self.cpu?, sent)
    }

    /// CPU microseconds of the whole machine (every process and the
    /// kernel) per successful operation, over the same stretch as
    /// [`SettingReport::cpu_us_per_op`]: with the cluster on this machine,
    /// what an operation costs in all.
    pub fn machine_cpu_us_per_op(&self) -> Option<f64> {
        per_op_us(self.machine?.busy, self.total_ops())
    }
}

fn per_op_us(cpu: Duration, ops: u64) -> Option<f64> {
    (ops > 0).then(|| cpu.as_secs_f64() * 1e6 / ops as f64)
}

/// A connection to the store under test: a ringkv node, or a RESP server
/// (Redis, Dynomite) for comparison.
pub(crate) enum Conn {
    Ringkv(ClusterClient),
    Resp(tokio::sync::Mutex<RespConn>),
}

/// What a call came to.
pub(crate) enum Outcome {
    /// `coordinator`: the node that coordinated it (from its receipt).
    Read {
        values: Vec<Vec<u8>>,
        context: Option<String>,
        coordinator: Option<NodeId>,
    },
    Written {
        context: Option<String>,
        coordinator: Option<NodeId>,
    },
    /// R or W replicas did not answer in time.
    Timeout,
    /// The node had no memory left for the request and refused it unrun
    /// (`ErrorKind::Overloaded`): load shed, to be retried later.
    Shed,
    /// Refused or failed, and why (the load phase reports the first).
    Error { reason: String },
}

impl Outcome {
    fn is_ok(&self) -> bool {
        matches!(self, Outcome::Read { .. } | Outcome::Written { .. })
    }
}

impl Conn {
    async fn call(&self, request: &Request, delay: Duration) -> Outcome {
        let Conn::Ringkv(client) = self else {
            return Outcome::Error {
                reason: "not a ringkv connection".into(),
            };
        };
        if !delay.is_zero() {
            ringkv_node::link_delay::sleep(delay).await;
        }
        let answer = client.call_within(request, answer_limit(request)).await;
        if !delay.is_zero() && !matches!(answer, Err(CallError::TimedOut { .. })) {
            ringkv_node::link_delay::sleep(delay).await;
        }
        outcome_of(answer)
    }

    async fn get(&self, key: &str, r: Consistency, timeout_ms: u32, delay: Duration) -> Outcome {
        match self {
            Conn::Ringkv(_) => {
                let get = Request::Get(GetRequest {
                    timeout_ms,
                    ..GetRequest::new(key, r)
                });
                self.call(&get, delay).await
            }
            Conn::Resp(conn) => {
                let mut conn = conn.lock().await;
                match tokio::time::timeout(resp_limit(timeout_ms), conn.get(key.as_bytes())).await {
                    Ok(Ok(value)) => Outcome::Read {
                        values: value.into_iter().collect(),
                        context: None,
                        coordinator: None,
                    },
                    Ok(Err(e)) => Outcome::Error {
                        reason: e.to_string(),
                    },
                    Err(_) => Outcome::Timeout,
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn put(
        &self,
        key: &str,
        value: &[u8],
        w: Consistency,
        context: Option<String>,
        overwrite: bool,
        timeout_ms: u32,
        delay: Duration,
    ) -> Outcome {
        match self {
            Conn::Ringkv(_) => {
                let put = Request::Put(PutRequest {
                    timeout_ms,
                    overwrite,
                    ..PutRequest::new(key, Payload::Value(value.to_vec()), w, context)
                });
                self.call(&put, delay).await
            }
            Conn::Resp(conn) => {
                let mut conn = conn.lock().await;
                match tokio::time::timeout(resp_limit(timeout_ms), conn.set(key.as_bytes(), value))
                    .await
                {
                    Ok(Ok(())) => Outcome::Written {
                        context: None,
                        coordinator: None,
                    },
                    Ok(Err(e)) => Outcome::Error {
                        reason: e.to_string(),
                    },
                    Err(_) => Outcome::Timeout,
                }
            }
        }
    }
}

/// How long a RESP client waits for an answer: as long as a ringkv client
/// waits for a request with that timeout ([`answer_limit`]), so that side
/// by side the two stores' timed-out requests count alike.
fn resp_limit(timeout_ms: u32) -> Duration {
    Duration::from_millis(u64::from(timeout_ms) + ringkv_core::wire::ANSWER_SLACK_MS)
}

/// How long a client waits for an answer: the node answers by the request's
/// deadline; a second more, and the client gives up on it (a dead
/// connection, a hung node), and moves on from a node that sent nothing
/// meanwhile.
pub(crate) fn answer_limit(request: &Request) -> Duration {
    request.answer_limit().unwrap_or(Duration::from_millis(
        u64::from(ringkv_core::wire::DEFAULT_REQUEST_TIMEOUT_MS)
            + ringkv_core::wire::ANSWER_SLACK_MS,
    ))
}

/// What a ringkv answer, or its absence, counts as.
///
/// A quorum not reached because replicas did not answer in time is a
/// timeout; one the coordinator gave up on because replicas failed
/// outright (down, refusing), as its receipt says, is an error, so that a
/// fast failure neither shows as a timeout nor puts its latency among the
/// answers'. (Not the time the client waited: a request forwarded to a
/// replica gives that replica only part of its deadline.)
pub(crate) fn outcome_of(answer: Result<Response, CallError>) -> Outcome {
    match answer {
        Ok(Response::Get(g)) => Outcome::Read {
            values: g.values,
            context: Some(g.context),
            coordinator: g.receipt.coordinator,
        },
        Ok(Response::Put(p)) => Outcome::Written {
            context: Some(p.context),
            coordinator: p.receipt.coordinator,
        },
        Err(CallError::TimedOut { .. }) => Outcome::Timeout,
        Ok(Response::Error(e)) if e.kind == ErrorKind::QuorumNotReached && some_timed_out(&e) => {
            Outcome::Timeout
        }
        Ok(Response::Error(e)) if e.kind == ErrorKind::Overloaded => Outcome::Shed,
        Ok(Response::Error(e)) => Outcome::Error { reason: e.message },
        Ok(other) => Outcome::Error {
            reason: format!("unexpected answer {other:?}"),
        },
        Err(e) => Outcome::Error {
            reason: e.to_string(),
        },
    }
}

/// Whether a quorum failure's receipt names a replica that did not answer
/// in time (or there is no receipt to tell).
fn some_timed_out(error: &ErrorReply) -> bool {
    error.receipt.as_ref().is_none_or(|receipt| {
        receipt
            .replicas
            .iter()
            .any(|r| r.outcome == ReplicaAnswer::Timeout)
    })
}

/// A read that client `client` coordinates itself (see [`crate::direct`]):
/// the key's first R replicas asked at once through `direct`, for up to
/// half of `timeout_ms`, or, unless they agree, a read coordinated by
/// `own`'s node in the time left. Also says whether it fell back.
async fn direct_get(
    direct: &DirectReads,
    own: &Conn,
    key: &str,
    r: Consistency,
    timeout_ms: u32,
    delay: Duration,
    client: usize,
) -> (Outcome, bool) {
    let started = Instant::now();
    let legs = r
        .required(direct.replicas())
        .ok()
        .and_then(|r| direct.legs(key.as_bytes(), r, client));
    if let Some(legs) = legs {
        // Half the time for the legs: a leg that cannot answer (its node
        // frozen, say) leaves the coordinator the other half.
        let leg_ms = (timeout_ms / 2).max(1);
        let get = Request::Get(GetRequest {
            timeout_ms: leg_ms,
            direct: true,
            ..GetRequest::new(key, r)
        });
        let asked = futures_util::future::join_all(legs.iter().map(|(_, conn)| conn.call(&get)));
        let limit = Duration::from_millis(u64::from(leg_ms));
        if let Ok(answers) = tokio::time::timeout(limit, asked).await {
            let answers = answers.into_iter().map(outcome_of).collect();
            let nodes: Vec<NodeId> = legs.into_iter().map(|(node, _)| node).collect();
            if let Some(read) = crate::direct::agreed(&nodes, answers) {
                return (read, false);
            }
        }
    }
    let spent_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
    match timeout_ms.checked_sub(spent_ms).filter(|left| *left > 0) {
        Some(left_ms) => (own.get(key, r, left_ms, delay).await, true),
        None => (Outcome::Timeout, true),
    }
}

/// Whether a client of `workload` in `updates` mode ever writes with a
/// context it kept: read-modify-writes always do, updates in context
/// mode. (An insert's record is new: no read has seen it, so there is
/// never a context to send.) Otherwise it keeps none, which saves a copy
/// and a map insert per read on a CPU the nodes may share.
fn keeps_contexts(workload: Workload, updates: UpdateMode) -> bool {
    workload.mix().iter().any(|(op, _)| match op {
        Op::ReadModifyWrite => true,
        Op::Update => updates == UpdateMode::Context,
        Op::Insert | Op::Read => false,
    })
}

/// How many connections `clients` share over `targets`: one per client,
/// up to `connections_per_target` per target.
fn connection_count(targets: usize, connections_per_target: usize, clients: usize) -> usize {
    (targets * connections_per_target.max(1)).min(clients)
}

/// How many of `config`'s clients send to each of its targets (in
/// order), as [`connect_all`] spreads them: connection j goes to target j
/// mod their number, and client i uses connection i mod theirs.
pub fn clients_per_target(config: &YcsbConfig) -> Vec<usize> {
    spread_clients(
        config.targets.len(),
        config.connections_per_target,
        config.concurrency.max(1),
    )
}

fn spread_clients(targets: usize, connections_per_target: usize, clients: usize) -> Vec<usize> {
    let connections = connection_count(targets, connections_per_target, clients);
    let mut per_target = vec![0; targets];
    if connections == 0 {
        return per_target;
    }
    for i in 0..clients {
        per_target[(i % connections) % targets] += 1;
    }
    per_target
}

async fn connect_all(config: &YcsbConfig, count: usize) -> Result<Vec<Arc<Conn>>, BenchError> {
    if !config.resp {
        // Connections go round-robin over the targets, and client i uses
        // connection i mod their number: clients still spread evenly
        // (`clients_per_target` counts them so).
        let clients = crate::connect_clients(
            &config.targets,
            connection_count(config.targets.len(), config.connections_per_target, count),
            config.cluster_key.as_ref(),
        )
        .await?;
        let conns: Vec<Arc<Conn>> = clients
            .into_iter()
            .map(|c| Arc::new(Conn::Ringkv(Arc::into_inner(c).expect("not shared yet"))))
            .collect();
        return Ok((0..count).map(|i| conns[i % conns.len()].clone()).collect());
    }
    let addr = *config.targets.first().ok_or(BenchError::NoTargets)?;
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        let conn = RespConn::connect(addr)
            .await
            .map_err(|e| BenchError::Unreachable {
                addr,
                reason: e.to_string(),
            })?;
        conns.push(Arc::new(Conn::Resp(tokio::sync::Mutex::new(conn))));
    }
    Ok(conns)
}

/// The pauses before the tries again of a load write shed or timed out.
const LOAD_RETRY_PAUSES_MS: [u64; 3] = [50, 250, 1000];

/// Writes records `0..records` at W=quorum; `progress(done)` after each.
pub async fn load(config: &YcsbConfig, progress: &(dyn Fn(u64) + Sync)) -> Result<(), BenchError> {
    let conns = connect_all(config, config.concurrency.max(1)).await?;
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Why the first failed write failed: the likeliest cause of the rest.
    let first_failure = Arc::new(std::sync::OnceLock::new());
    let mut tasks = tokio::task::JoinSet::new();
    let step = conns.len() as u64;
    for (w, conn) in conns.iter().enumerate() {
        let (conn, done, failed) = (conn.clone(), done.clone(), failed.clone());
        let first_failure = first_failure.clone();
        let prefix = config.key_prefix.clone();
        let (records, value, timeout_ms) = (
            config.records,
            vec![b'v'; config.value_bytes],
            config.request_timeout_ms,
        );
        tasks.spawn(async move {
            for i in (w as u64..records).step_by(step as usize) {
                let key = record_key(&prefix, i);
                let outcome = with_load_retries(|retry| {
                    conn.put(
                        &key,
                        &value,
                        Consistency::Quorum,
                        None,
                        retry,
                        timeout_ms,
                        Duration::ZERO,
                    )
                })
                .await;
                if !outcome.is_ok() {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = first_failure.set(match outcome {
                        Outcome::Error { reason } => reason,
                        Outcome::Shed => {
                            "shed: the node was out of memory for requests".to_string()
                        }
                        _ => "timed out".to_string(),
                    });
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    while !tasks.is_empty() {
        tokio::select! {
            _ = tasks.join_next() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        progress(done.load(std::sync::atomic::Ordering::Relaxed));
    }
    close_all(conns).await;
    match failed.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Ok(()),
        n => Err(BenchError::LoadFailed {
            failed: n,
            first: first_failure.get().cloned().unwrap_or_default(),
        }),
    }
}

/// Runs a load write (`put(retry)`) and, while it is shed or times out,
/// tries it again after [`LOAD_RETRY_PAUSES_MS`] (a node out of request
/// memory asks for a pause), rather than fail a load of hours. A retry
/// (`retry` true) overwrites whatever the first try left, not add a
/// sibling beside it. The last try's outcome.
async fn with_load_retries<F, Fut>(mut put: F) -> Outcome
where
    F: FnMut(bool) -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let mut outcome = put(false).await;
    for pause_ms in LOAD_RETRY_PAUSES_MS {
        if !matches!(outcome, Outcome::Shed | Outcome::Timeout) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        outcome = put(true).await;
    }
    outcome
}

/// Failovers over the distinct connections (clients share them).
fn failovers(conns: &[Arc<Conn>]) -> u64 {
    let mut seen = std::collections::HashSet::new();
    conns
        .iter()
        .filter(|c| seen.insert(Arc::as_ptr(c)))
        .map(|c| match c.as_ref() {
            Conn::Ringkv(client) => client.failovers(),
            Conn::Resp(_) => 0,
        })
        .sum()
}

async fn close_all(conns: Vec<Arc<Conn>>) {
    ClusterClient::close_all(conns.into_iter().filter_map(|c| match Arc::into_inner(c) {
        Some(Conn::Ringkv(client)) => Some(client),
        _ => None,
    }))
    .await;
}

/// The record numbers of a run's inserts, as YCSB's
/// `AcknowledgedCounterGenerator` hands them out: numbers are taken in
/// order, and reads choose only among records below [`acknowledged`], the
/// first number whose insert is not over. Under "latest" the newest record
/// is the likeliest read, and reading one whose insert is still under way
/// would find nothing and count as a read.
///
/// Invariant: `acknowledged <= taken`, and every number below
/// `acknowledged` has been [`finish`]ed (successful or not).
///
/// [`acknowledged`]: Inserts::acknowledged
/// [`finish`]: Inserts::finish
#[derive(Debug)]
struct Inserts {
    next: std::sync::atomic::AtomicU64,
    acknowledged: std::sync::atomic::AtomicU64,
    /// Numbers finished above `acknowledged`, waiting for the ones below.
    finished_ahead: std::sync::Mutex<std::collections::BTreeSet<u64>>,
}

impl Inserts {
    /// After a load of `records` (numbers `0..records`, all over).
    fn new(records: u64) -> Self {
        Inserts {
            next: records.into(),
            acknowledged: records.into(),
            finished_ahead: Default::default(),
        }
    }

    /// A new record number to insert.
    fn take(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Numbers taken so far: the records there are once every insert is over.
    fn taken(&self) -> u64 {
        self.next.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The insert of `record` (a number [`take`](Inserts::take)n) is over.
    fn finish(&self, record: u64) {
        use std::sync::atomic::Ordering::Release;
        let mut ahead = self
            .finished_ahead
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ahead.insert(record);
        // Only changed under the lock, so this load is the latest value.
        let mut below = self.acknowledged.load(std::sync::atomic::Ordering::Relaxed);
        while ahead.remove(&below) {
            below += 1;
        }
        self.acknowledged.store(below, Release);
    }

    /// Records that may be read: every insert below this is over.
    fn acknowledged(&self) -> u64 {
        self.acknowledged.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Runs `setting` for the configured duration; `progress(elapsed share)`
/// is called every 100 ms.
pub async fn run_setting(
    config: &YcsbConfig,
    setting: &Setting,
    records: u64,
    progress: &(dyn Fn(f64) + Sync),
) -> Result<SettingReport, BenchError> {
    let clients = connect_all(config, config.concurrency.max(1)).await?;
    let direct = if config.client_reads {
        let asked = clients.first().ok_or(BenchError::NoTargets)?;
        let direct = DirectReads::connect(
            asked,
            config.connections_per_target,
            config.cluster_key.as_ref(),
        )
        .await?;
        Some(Arc::new(direct))
    } else {
        None
    };
    // Built once, outside the timed window: a zipfian over many records
    // takes a while to set up.
    let distribution = config
        .distribution
        .unwrap_or_else(|| config.workload.distribution());
    let inserts = config
        .workload
        .mix()
        .iter()
        .any(|(op, _)| *op == Op::Insert);
    let chooser = KeyChooser::new(distribution, records, inserts);
    // Inserts take numbers from one counter, so clients never insert the
    // same key, and every client's chooser learns of the others' inserts
    // once they are over.
    let inserts = Arc::new(Inserts::new(records));
    // Every client's histograms exist before the clock starts: each is
    // 136 KiB to allocate and zero, and creating them on a client's
    // first request of each kind charged those requests (all clients' at
    // once, at the start of the run) milliseconds of latency.
    let mut fresh_reports: Vec<HashMap<Op, OpReport>> = (0..clients.len())
        .map(|_| {
            config
                .workload
                .mix()
                .iter()
                .map(|(op, _)| (*op, OpReport::new()))
                .collect()
        })
        .collect();
    // Connected before the clock starts: handshakes are not the workload's.
    let prober_conns = connect_prober(config).await;
    let started = Instant::now();
    // Requests sent before this are not counted (the warm-up).
    let measured_from = started + config.warmup;
    let cpu_at_start = if config.warmup.is_zero() {
        // Before the clients start, as a timer could be late.
        let now = (crate::process_cpu(), MachineReading::now());
        tokio::spawn(async move { now })
    } else {
        tokio::spawn(async move {
            tokio::time::sleep_until(measured_from.into()).await;
            (crate::process_cpu(), MachineReading::now())
        })
    };
    let deadline = measured_from + config.duration;
    // An open loop's clients go on taking requests that came due before the
    // deadline for up to a request timeout past it: stopping at the
    // deadline would leave out the requests queued longest, the worst of
    // its latencies.
    let last_send = match config.rate_per_s {
        Some(_) => deadline + Duration::from_millis(u64::from(config.request_timeout_ms)),
        None => deadline,
    };
    let pacer = match config.rate_per_s {
        Some(rate) => Some(
            Pacer::start(rate, started, deadline).map_err(|source| BenchError::Pacer { source })?,
        ),
        None => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (w, client) in clients.iter().enumerate() {
        let (client, pacer, direct) = (client.clone(), pacer.clone(), direct.clone());
        let (config, setting) = (config.clone(), setting.clone());
        let (mut chooser, inserts) = (chooser.clone(), inserts.clone());
        let mut reports = fresh_reports.pop().unwrap_or_default();
        tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed ^ ((w as u64) << 32));
            let mut contexts: HashMap<u64, String> = HashMap::new();
            let keep_contexts = keeps_contexts(config.workload, config.updates);
            let mut read_stats = ReadStats::default();
            let mut client_reads = ClientReadCounts::default();
            // When this client's last measured request succeeded.
            let mut last_success: Option<Instant> = None;
            let mut timing = OpenLoopTiming::default();
            let value = vec![b'u'; config.value_bytes];
            // When this client was last free to take a request up: from
            // the start (the first request is due then, before the task
            // first runs), then from the end of each request.
            let mut free_since = started;
            loop {
                // Open loop: wait for the next due request; closed loop:
                // go on at once, until the deadline.
                let due = match &pacer {
                    Some(pacer) => match pacer.next().await {
                        Some(due) => Some(due),
                        None => break,
                    },
                    None => None,
                };
                // When this client took the request up (later than it came
                // due if every client was busy).
                let picked = Instant::now();
                if picked >= last_send {
                    break;
                }
                let op = config.workload.next_op(&mut rng);
                let record = match op {
                    Op::Insert => inserts.take(),
                    _ => {
                        chooser.grow_to(inserts.acknowledged());
                        chooser.next_existing(&mut rng)
                    }
                };
                let key = record_key(&config.key_prefix, record);
                // Latency counts from the intended start in an open loop, so
                // queueing behind a slow request is not hidden (coordinated
                // omission); from the send in a closed loop.
                let sent = due.unwrap_or_else(Instant::now);
                let (timeout_ms, delay) = (config.request_timeout_ms, config.client_delay);
                let mut outcome = Outcome::Written {
                    context: None,
                    coordinator: None,
                };
                // When the last answer came: the bookkeeping after it is
                // the client's, not the store's.
                let mut answered = sent;
                if matches!(op, Op::Read | Op::ReadModifyWrite) {
                    outcome = match &direct {
                        Some(direct) => {
                            let (read, fell_back) =
                                direct_get(direct, &client, &key, setting.r, timeout_ms, delay, w)
                                    .await;
                            if sent >= measured_from {
                                client_reads.fallbacks += u64::from(fell_back);
                                client_reads.direct += u64::from(!fell_back);
                            }
                            read
                        }
                        None => client.get(&key, setting.r, timeout_ms, delay).await,
                    };
                    answered = Instant::now();
                    if let Outcome::Read {
                        values, context, ..
                    } = &outcome
                    {
                        if sent >= measured_from {
                            read_stats.record(values.len() as u64);
                        }
                        if let Some(context) = context.as_ref().filter(|_| keep_contexts) {
                            contexts.insert(record, context.clone());
                        }
                    }
                }
                if matches!(op, Op::Update | Op::Insert | Op::ReadModifyWrite) && outcome.is_ok() {
                    // Read-modify-write keeps its read's context; plain
                    // updates and inserts follow the update mode.
                    let overwrite =
                        op != Op::ReadModifyWrite && config.updates == UpdateMode::Overwrite;
                    let context = if overwrite {
                        None
                    } else {
                        contexts.get(&record).cloned()
                    };
                    outcome = client
                        .put(
                            &key, &value, setting.w, context, overwrite, timeout_ms, delay,
                        )
                        .await;
                    answered = Instant::now();
                    if let Outcome::Written {
                        context: Some(context),
                        ..
                    } = &outcome
                    {
                        if keep_contexts {
                            contexts.insert(record, context.clone());
                        }
                    }
                }
                if due.is_some() {
                    // Warm-up requests too: a backlog of them can keep the
                    // clients from sending any of the window's.
                    timing.service(answered.saturating_duration_since(picked));
                }
                if op == Op::Insert {
                    // Over, whether or not it succeeded (as in YCSB): a
                    // failed insert must not keep later ones from being read.
                    inserts.finish(record);
                }
                if sent >= measured_from {
                    if outcome.is_ok() {
                        last_success = last_success.max(Some(answered));
                    }
                    if let Some(due) = due {
                        timing.pickup(due, free_since, picked);
                    }
                    if due.is_some() && outcome.is_ok() {
                        let stretch = open_loop_stretch(sent, measured_from, deadline);
                        timing.lag(stretch, answered.saturating_duration_since(sent));
                    }
                    let latency_us = answered.duration_since(sent).as_micros() as u64;
                    reports
                        .entry(op)
                        .or_insert_with(OpReport::new)
                        .count(outcome, latency_us);
                }
                // Bounded: a context per record up to 100,000 records (past
                // that, forgetting makes later updates blind: more siblings).
                if contexts.len() > 100_000 {
                    contexts.clear();
                }
                free_since = Instant::now();
            }
            // A short run may never draw a rare operation: no empty row.
            reports.retain(|_, report| report.attempts() > 0);
            (reports, read_stats, last_success, timing, client_reads)
        });
    }
    let prober = prober_conns.map(|conns| {
        let (config, setting) = (config.clone(), setting.clone());
        tokio::spawn(
            async move { probe_with(&config, &setting, conns, measured_from, deadline).await },
        )
    });
    let mut merged: HashMap<Op, OpReport> = HashMap::new();
    let mut read_stats = ReadStats::default();
    let mut last_success: Option<Instant> = None;
    let mut timing = OpenLoopTiming::default();
    let mut client_reads = ClientReadCounts::default();
    while !tasks.is_empty() {
        tokio::select! {
            done = tasks.join_next() => {
                match done {
                    Some(Ok((reports, stats, last, client_timing, reads))) => {
                        timing.merge(&client_timing);
                        client_reads.merge(&reads);
                        for (op, report) in reports {
                            merged.entry(op).or_insert_with(OpReport::new).merge(&report);
                        }
                        read_stats.merge(&stats);
                        last_success = last_success.max(last);
                    }
                    Some(Err(e)) => return Err(BenchError::ClientFailed { reason: e.to_string() }),
                    None => {}
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let whole = (config.warmup + config.duration).as_secs_f64();
        progress((started.elapsed().as_secs_f64() / whole).min(1.0));
    }
    // Closed loop: the requests counted are those sent in the measured
    // window, so they are divided by it; the time to the last answer
    // would add the slowest request's tail (seconds, for one that timed
    // out) to a window of a few. Open loop: see `open_loop_elapsed`.
    let elapsed = match config.rate_per_s {
        Some(_) => open_loop_elapsed(
            config.duration,
            timing.median_lag(Stretch::First),
            timing.median_lag(Stretch::Last),
            last_success.map(|last| last.saturating_duration_since(measured_from)),
        ),
        None => config.duration,
    };
    let (cpu_before, machine_before) = cpu_at_start.await.unwrap_or_default();
    let cpu = cpu_before
        .zip(crate::process_cpu())
        .map(|(before, after)| after.saturating_sub(before));
    let machine = machine_before
        .zip(MachineReading::now())
        .and_then(|(before, after)| before.share_until(&after));
    let probed = match prober {
        Ok(p) => p
            .await
            .unwrap_or_else(|e| Err(format!("the prober failed: {e}"))),
        Err(why) => Err(why),
    };
    let (probed, staleness_skipped) = match probed {
        Ok(probed) => (probed, None),
        Err(why) => (Probed::default(), Some(why)),
    };
    let failovers = failovers(&clients);
    close_all(clients).await;
    if let Some(direct) = direct.clone().and_then(Arc::into_inner) {
        direct.close().await;
    }
    let mut ops: Vec<(Op, OpReport)> = merged.into_iter().collect();
    ops.sort_by_key(|(op, _)| op.as_str());
    let mut report = SettingReport {
        cpu,
        machine,
        rate_per_s: config.rate_per_s,
        peak: None,
        unsent: None,
        mean_service_ms: config.rate_per_s.and_then(|_| timing.mean_service_ms()),
        pickup_us: config.rate_per_s.map(|_| timing.pickup_us),
        client_queue_us: config.rate_per_s.map(|_| timing.client_queue_us),
        setting: setting.clone(),
        elapsed,
        ops,
        reads: read_stats.reads,
        reads_not_found: read_stats.not_found,
        sibling_reads: read_stats.sibling_reads,
        values_read: read_stats.values,
        max_siblings: read_stats.max_values,
        staleness: probed.visibility,
        probers: probed.probers,
        staleness_skipped,
        records_after: inserts.taken(),
        failovers,
        predicted_p50: Vec::new(),
        client_reads: direct.is_some().then_some(client_reads),
    };
    if let Some(rate) = config.rate_per_s {
        // Requests due during the warm-up are neither counted nor charged:
        // those never sent are the schedule's last.
        let due = pacer::due_count(rate, config.warmup + config.duration);
        let measured = due - pacer::due_count(rate, config.warmup);
        let unsent = measured.saturating_sub(report.attempts());
        let never_sent = due - unsent..due;
        let gave_up_after = last_send - started;
        let seed = config.seed ^ UNSENT_SEED;
        charge_unsent(
            &mut report.ops,
            config.workload,
            rate,
            seed,
            never_sent,
            gave_up_after,
        );
        report.unsent = Some(unsent);
    }
    Ok(report)
}

/// The part of the measured window an open-loop request came due in: its
/// first or last tenth (at most a second each), whose answers' lags give
/// the ops/s window ([`open_loop_elapsed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stretch {
    First,
    Last,
    Middle,
}

fn open_loop_stretch(due: Instant, measured_from: Instant, deadline: Instant) -> Stretch {
    let edge = ((deadline - measured_from) / 10).min(Duration::from_secs(1));
    if due < measured_from + edge {
        Stretch::First
    } else if due + edge >= deadline {
        Stretch::Last
    } else {
        Stretch::Middle
    }
}

/// An open loop's timings, per client and merged: how long each request
/// took once sent (the warm-up's too), and how far behind schedule the
/// answers to the requests due in the window's first and last stretch
/// came.
#[derive(Debug)]
struct OpenLoopTiming {
    service_us: u128,
    sent: u64,
    first_lag_us: Histogram<u64>,
    last_lag_us: Histogram<u64>,
    /// From due to picked up by a client, for the measured requests.
    pickup_us: Histogram<u64>,
    /// The part of `pickup_us` before the client that took the request up
    /// was free (0 when it was free first).
    client_queue_us: Histogram<u64>,
}

impl Default for OpenLoopTiming {
    fn default() -> Self {
        OpenLoopTiming {
            service_us: 0,
            sent: 0,
            first_lag_us: new_histogram(),
            last_lag_us: new_histogram(),
            pickup_us: new_histogram(),
            client_queue_us: new_histogram(),
        }
    }
}

impl OpenLoopTiming {
    /// A request sent that took `service` from its sending to its answer
    /// or the client giving up.
    fn service(&mut self, service: Duration) {
        self.service_us += service.as_micros();
        self.sent += 1;
    }

    /// A measured request that came due in `stretch` succeeded `latency`
    /// after it came due.
    fn lag(&mut self, stretch: Stretch, latency: Duration) {
        let us = latency.as_micros().max(1) as u64;
        match stretch {
            Stretch::First => record_latency(&mut self.first_lag_us, us, 1),
            Stretch::Last => record_latency(&mut self.last_lag_us, us, 1),
            Stretch::Middle => {}
        }
    }

    /// A measured request, due at `due`, that a client free since
    /// `free_since` took up at `picked`. The queue from the pacer is
    /// first-in, first-out, so a request due before its client was free
    /// found no other client free either: it waited for one from `due` to
    /// `free_since`.
    fn pickup(&mut self, due: Instant, free_since: Instant, picked: Instant) {
        let us = picked.saturating_duration_since(due).as_micros() as u64;
        record_latency(&mut self.pickup_us, us, 1);
        let queued = free_since.saturating_duration_since(due);
        record_latency(&mut self.client_queue_us, queued.as_micros() as u64, 1);
    }

    fn merge(&mut self, other: &OpenLoopTiming) {
        self.service_us += other.service_us;
        self.sent += other.sent;
        // Same bounds: adding cannot fail.
        let _ = self.first_lag_us.add(&other.first_lag_us);
        let _ = self.last_lag_us.add(&other.last_lag_us);
        let _ = self.pickup_us.add(&other.pickup_us);
        let _ = self.client_queue_us.add(&other.client_queue_us);
    }

    /// The median lag of the successes due in `stretch`, if any.
    fn median_lag(&self, stretch: Stretch) -> Option<Duration> {
        let h = match stretch {
            Stretch::First => &self.first_lag_us,
            Stretch::Last => &self.last_lag_us,
            Stretch::Middle => return None,
        };
        (!h.is_empty()).then(|| Duration::from_micros(h.value_at_quantile(0.5)))
    }

    fn mean_service_ms(&self) -> Option<f64> {
        (self.sent > 0).then(|| self.service_us as f64 / self.sent as f64 / 1000.0)
    }
}

/// What an open loop's ops/s divides by. Its successes are those of the
/// requests due in the window (`window` long): a store that kept up
/// answered them over a stretch as long, shifted by its latency, and one
/// that fell behind over a longer one: the window plus how much further
/// behind schedule it answered at the end than at the start (`last_lag`
/// and `first_lag`, the median latencies of the successes due in the
/// window's last and first stretch). Medians, so that one slow answer does
/// not stretch the window: dividing by the time to the last success did
/// (one request stalled 1.9 s at the end of a 6 s window cut the rate by a
/// quarter). With no success due in either stretch (the last requests all
/// failed, or were never sent: a store far behind), `to_last_success`.
/// Never less than the window.
fn open_loop_elapsed(
    window: Duration,
    first_lag: Option<Duration>,
    last_lag: Option<Duration>,
    to_last_success: Option<Duration>,
) -> Duration {
    match (first_lag, last_lag) {
        (Some(first), Some(last)) => window + last.saturating_sub(first),
        _ => to_last_success.unwrap_or(Duration::ZERO),
    }
    .max(window)
}

/// Counts the open loop's requests `never_sent` (their indexes in the
/// schedule at `rate_per_s`) as timeouts, each of an operation drawn from
/// `workload`'s mix, with the time from when it was due to `gave_up_after`
/// (both from the start) as its latency.
///
/// Past [`UNSENT_DRAWS`] requests, each draw stands for a run of
/// consecutive ones (their waits differ by less than the run's length in
/// the schedule): a rate far beyond the store's would otherwise take
/// minutes to charge.
fn charge_unsent(
    ops: &mut Vec<(Op, OpReport)>,
    workload: Workload,
    rate_per_s: u64,
    seed: u64,
    never_sent: std::ops::Range<u64>,
    gave_up_after: Duration,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let stride = never_sent
        .end
        .saturating_sub(never_sent.start)
        .div_ceil(UNSENT_DRAWS)
        .max(1);
    let end = never_sent.end;
    for i in never_sent.step_by(stride as usize) {
        let count = stride.min(end - i);
        let op = workload.next_op(&mut rng);
        // A run is charged at its middle request's wait.
        let waited = gave_up_after.saturating_sub(pacer::due_after(i + count / 2, rate_per_s));
        // Kept sorted by name, as the run's reports are.
        let at = match ops.binary_search_by(|(o, _)| o.as_str().cmp(op.as_str())) {
            Ok(at) => at,
            Err(at) => {
                ops.insert(at, (op, OpReport::new()));
                at
            }
        };
        let report = &mut ops[at].1;
        report.timeouts += count;
        record_latency(
            &mut report.latency_us,
            u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
            count,
        );
    }
}

/// How many draws [`charge_unsent`] makes at most.
const UNSENT_DRAWS: u64 = 1_000_000;

/// Seeds the draw of the unsent requests' operations, apart from the
/// clients' draws.
const UNSENT_SEED: u64 = 0x756e_7365_6e74;

/// How long the staleness prober waits after a probe failed.
const PROBE_FAILURE_PAUSE: Duration = Duration::from_millis(50);

/// The staleness prober alone, from now until `until` (see [`probe_with`]).
pub async fn probe_staleness(
    config: &YcsbConfig,
    setting: &Setting,
    until: Instant,
) -> Result<Probed, String> {
    let conns = connect_prober(config).await?;
    probe_with(config, setting, conns, Instant::now(), until).await
}

/// Connects the staleness prober to the coordinators it compares: the
/// first `probers` + 1 targets, one connection each and no failover
/// (staleness is measured between coordinators), leaving out those that
/// do not answer. Fails, with the reason, with fewer than two that do, or
/// when no prober was asked for.
pub(crate) async fn connect_prober(config: &YcsbConfig) -> Result<Vec<Arc<Conn>>, String> {
    if config.resp {
        return Err("a RESP store has no coordinators to compare".to_string());
    }
    if config.probers == 0 {
        return Err("--probers 0 asks for none".to_string());
    }
    if config.targets.len() < 2 {
        return Err("it needs two coordinators: give --cluster two or more addresses".to_string());
    }
    let key = config.cluster_key.as_ref();
    let (mut conns, mut failures) = (Vec::new(), Vec::new());
    for addr in config.targets.iter().take(config.probers + 1) {
        match ClusterClient::connect(vec![*addr], 0, Duration::from_secs(3), key).await {
            Ok(conn) => conns.push(Arc::new(Conn::Ringkv(conn))),
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    // The ones that answer, if at least two do.
    if conns.len() < 2 {
        close_all(conns).await;
        return Err(format!(
            "the prober could not connect to two coordinators: {}",
            failures.join("; ")
        ));
    }
    Ok(conns)
}

/// The staleness prober (see the module docs), over `conns` (from
/// [`connect_prober`]): prober `k` writes through `conns[k]` and reads
/// through the next one (round the list), so the curve covers several
/// pairs of coordinators, not one link; each cycles through
/// [`STALENESS_T_MS`]. At t = 0 the read is sent as soon as the write is
/// acknowledged; at larger t, once t has passed since (the timer may be up
/// to a millisecond late, and `gap_us` records what it was). Probes begin
/// at `from` and end at `until`.
pub(crate) async fn probe_with(
    config: &YcsbConfig,
    setting: &Setting,
    conns: Vec<Arc<Conn>>,
    from: Instant,
    until: Instant,
) -> Result<Probed, String> {
    let mut out: Vec<Visibility> = STALENESS_T_MS
        .iter()
        .map(|t| Visibility {
            t_ms: *t,
            ..Visibility::default()
        })
        .collect();
    tokio::time::sleep_until(from.into()).await;
    let run: u32 = rand::thread_rng().gen();
    let mut probers = tokio::task::JoinSet::new();
    for prober in 0..config.probers {
        let (w, r) = prober_pair(prober, conns.len());
        let (writer, reader) = (conns[w].clone(), conns[r].clone());
        let (config, setting, out) = (config.clone(), setting.clone(), out.clone());
        probers.spawn(async move {
            let keys = format!("pbs:{run:08x}:{prober}");
            probe(
                &config, &setting, &writer, &reader, &keys, prober, until, out,
            )
            .await
        });
    }
    let (mut failed, mut finished) = (None, 0);
    while let Some(done) = probers.join_next().await {
        match done {
            Ok(theirs) => {
                finished += 1;
                for (total, v) in out.iter_mut().zip(theirs) {
                    total.probes += v.probes;
                    total.fresh += v.fresh;
                    total.failed += v.failed;
                    total.gap_us += v.gap_us;
                    total.same_coordinator += v.same_coordinator;
                }
            }
            Err(e) => failed = Some(e),
        }
    }
    close_all(conns).await;
    // A prober that panicked took its probes with it: no curve.
    match failed {
        Some(e) => Err(format!("a prober failed: {e}")),
        None => Ok(Probed {
            visibility: out,
            probers: finished,
        }),
    }
}

/// Which of `coordinators` connections prober `prober` writes through
/// and reads through: consecutive ones, round the list, so probers cover
/// different pairs (two coordinators: both directions).
fn prober_pair(prober: usize, coordinators: usize) -> (usize, usize) {
    (prober % coordinators, (prober + 1) % coordinators)
}

/// Staleness probers running at once unless told. When requests take a
/// fraction of a millisecond a probe takes about the mean of
/// [`STALENESS_T_MS`] (28 ms), so each prober sends up to 70 requests a
/// second (not counted as operations, so a throughput run should not carry
/// many) and 4 make about 25 probes per t a second.
pub const PROBERS_DEFAULT: usize = 4;

/// Probers unless told when the nodes are in two or more regions (the
/// embedded cluster's emulated ones, or the `--region` of a cluster's
/// members that are up, as their status gives it). There a probe also waits
/// out the write's and the read's cross-region round trips, so 4 probers
/// made only 10–35 probes per t in the default bench's 6 s per setting,
/// and `one`'s fresh@0 interval spanned 29 points. 16 make 4 times the
/// probes (38–140 per t), intervals about half as wide, at 8–24 requests a
/// second each; that cost the default run 3–4% of its ops/s (medians;
/// see bench/RESULTS.md, session 44).
pub const PROBERS_ACROSS_REGIONS: usize = 16;

/// The most probers `--probers` takes: each has its own key space and
/// pair of coordinators to cycle, and past this the probes' own load
/// starts to be the workload.
pub const PROBERS_MAX: usize = 64;

/// One prober's loop (see [`probe_with`]): writes keys `{keys}:{i}`
/// once each, cycling through the waits from `first_slot` on, until `until`.
#[allow(clippy::too_many_arguments)]
async fn probe(
    config: &YcsbConfig,
    setting: &Setting,
    writer: &Conn,
    reader: &Conn,
    keys: &str,
    first_slot: usize,
    until: Instant,
    mut out: Vec<Visibility>,
) -> Vec<Visibility> {
    let (timeout_ms, delay) = (config.request_timeout_ms, config.client_delay);
    let mut i = 0u64;
    while Instant::now() < until {
        let slot = (first_slot + i as usize) % out.len();
        let key = format!("{keys}:{i}");
        let value = format!("v{i}").into_bytes();
        i += 1;
        let written = writer
            .put(&key, &value, setting.w, None, false, timeout_ms, delay)
            .await;
        let acknowledged = Instant::now();
        let (verdict, gap) = if written.is_ok() {
            // t = 0 must not wait at all.
            let t = Duration::from_millis(out[slot].t_ms);
            if !t.is_zero() {
                ringkv_node::link_delay::sleep_until(acknowledged + t).await;
            }
            let gap = acknowledged.elapsed();
            let read = reader.get(&key, setting.r, timeout_ms, delay).await;
            (verdict(&written, &read, &value), gap)
        } else {
            (Verdict::Failed, Duration::ZERO)
        };
        match verdict {
            Verdict::Fresh | Verdict::Stale => {
                out[slot].probes += 1;
                out[slot].gap_us += gap.as_micros() as u64;
                if verdict == Verdict::Fresh {
                    out[slot].fresh += 1;
                }
            }
            Verdict::SameCoordinator => out[slot].same_coordinator += 1,
            Verdict::Failed => {
                out[slot].failed += 1;
                // A cluster refusing requests at once must not make the
                // prober spin (and load it further).
                tokio::time::sleep(PROBE_FAILURE_PAUSE).await;
            }
        }
    }
    out
}

/// What one staleness probe shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The read, coordinated elsewhere, saw the write.
    Fresh,
    /// It did not.
    Stale,
    /// One node coordinated both: not a probe of staleness between two.
    SameCoordinator,
    /// The write or the read failed.
    Failed,
}

fn verdict(written: &Outcome, read: &Outcome, value: &[u8]) -> Verdict {
    match (written, read) {
        (
            Outcome::Written {
                coordinator: by_writer,
                ..
            },
            Outcome::Read {
                values,
                coordinator: by_reader,
                ..
            },
        ) => {
            if by_writer.is_some() && by_writer == by_reader {
                Verdict::SameCoordinator
            } else if values.iter().any(|v| v == value) {
                Verdict::Fresh
            } else {
                Verdict::Stale
            }
        }
        _ => Verdict::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients spread over targets as their connections do: evenly when
    /// each has its own, and by connection when they share fewer.
    #[test]
    fn clients_spread_over_the_targets_as_their_connections_do() {
        assert_eq!(spread_clients(5, 1, 50), vec![10; 5]);
        assert_eq!(spread_clients(3, 50, 4), vec![2, 1, 1]);
        // Two connections to three targets: clients alternate between them.
        assert_eq!(spread_clients(3, 1, 2), vec![1, 1, 0]);
        // Four connections (two per target), seven clients: 0,2 | 1,3.
        assert_eq!(spread_clients(2, 2, 7), vec![4, 3]);
        assert_eq!(spread_clients(0, 1, 5), Vec::<usize>::new());
        assert_eq!(spread_clients(3, 1, 0), vec![0, 0, 0]);
    }

    /// Contexts are kept only where a later write sends one back.
    #[test]
    fn contexts_are_kept_only_for_the_writes_that_send_them() {
        use UpdateMode::{Context, Overwrite};
        for (workload, updates, kept) in [
            (Workload::C, Context, false),
            (Workload::C, Overwrite, false),
            (Workload::A, Overwrite, false),
            (Workload::B, Overwrite, false),
            (Workload::D, Overwrite, false),
            (Workload::A, Context, true),
            (Workload::B, Context, true),
            (Workload::D, Context, false),
            (Workload::F, Overwrite, true),
            (Workload::F, Context, true),
        ] {
            assert_eq!(
                keeps_contexts(workload, updates),
                kept,
                "{workload} {updates:?}"
            );
        }
    }

    /// The wait from due to pick-up: what each client saw, merged, and
    /// never negative (a client that took a request up before it was due
    /// would be a pacer bug, not a negative wait).
    #[test]
    fn pickup_waits_merge_across_clients() {
        let due = Instant::now();
        let (mut a, mut b) = (OpenLoopTiming::default(), OpenLoopTiming::default());
        for us in [10, 20, 30] {
            a.pickup(due, due, due + Duration::from_micros(us));
        }
        b.pickup(due, due, due + Duration::from_millis(5));
        b.pickup(due + Duration::from_millis(1), due, due);
        a.merge(&b);
        let h = &a.pickup_us;
        assert_eq!(h.len(), 5);
        assert_eq!(h.min(), 0);
        assert!(h.equivalent(h.max(), 5000), "{}", h.max());
        assert!(h.equivalent(h.value_at_quantile(0.5), 20));
        // A client free before each came due: nothing queued.
        assert_eq!(a.client_queue_us.len(), 5);
        assert_eq!(a.client_queue_us.max(), 0);
    }

    /// The part of a pickup queued for a free client: from due to when
    /// the client that took it was free, and none for a client already
    /// free when it came due.
    #[test]
    fn a_pickup_is_split_into_the_queue_for_a_client_and_the_rest() {
        let due = Instant::now();
        let us = Duration::from_micros;
        let mut t = OpenLoopTiming::default();
        // Due at 0; its client finished an earlier request at 3 ms and
        // took it up at 3.2 ms.
        t.pickup(due, due + us(3000), due + us(3200));
        // Its client was free 1 ms before it came due, and 0.4 ms late.
        t.pickup(due, due - us(1000), due + us(400));
        // Its client was free 0.5 ms after it came due, and took it up
        // 0.1 ms later.
        t.pickup(due, due + us(500), due + us(600));
        let q = &t.client_queue_us;
        assert_eq!(q.len(), 3);
        assert!(q.equivalent(q.max(), 3000), "{}", q.max());
        assert_eq!(q.count_at(0), 1);
        assert!(
            q.equivalent(q.value_at_quantile(0.5), 500),
            "{}",
            q.value_at_quantile(0.5)
        );
        assert!(t.pickup_us.equivalent(t.pickup_us.max(), 3200));
    }

    /// An open loop's ops/s window: the measured window for a store that
    /// kept up, however late one answer came; longer by how much further
    /// behind it fell; the time to the last success when no late request
    /// succeeded; never shorter than the window.
    #[test]
    fn one_late_answer_does_not_stretch_an_open_loop_s_window() {
        let ms = Duration::from_millis;
        let window = ms(6000);
        // 5,000/s for 6 s, answered in 2 ms, but for one at the very end
        // that took 1.9 s.
        let start = Instant::now();
        let deadline = start + window;
        let mut timing = OpenLoopTiming::default();
        for i in 0..30_000u64 {
            let due = start + Duration::from_micros(200 * i);
            let latency = if i == 29_999 { ms(1900) } else { ms(2) };
            timing.service(latency);
            timing.lag(open_loop_stretch(due, start, deadline), latency);
        }
        let first = timing.median_lag(Stretch::First);
        let last = timing.median_lag(Stretch::Last);
        let to_last_success = Some(ms(5999 + 1900));
        assert_eq!(
            open_loop_elapsed(window, first, last, to_last_success),
            window
        );
        assert!((timing.mean_service_ms().unwrap() - 2.06).abs() < 0.01);

        // A store falling behind: answers 10 ms late at the start, 2 s late
        // at the end.
        let elapsed = open_loop_elapsed(window, Some(ms(10)), Some(ms(2010)), None);
        assert_eq!(elapsed, ms(8000));
        // Caught up (a backlog from the warm-up): never under the window.
        assert_eq!(
            open_loop_elapsed(window, Some(ms(500)), Some(ms(5)), None),
            window
        );
        // The last requests all failed or were never sent.
        assert_eq!(
            open_loop_elapsed(window, Some(ms(10)), None, Some(ms(9000))),
            ms(9000)
        );
        assert_eq!(open_loop_elapsed(window, None, None, None), window);
        // Answers due mid-window leave the lags alone, and the stretches
        // are the first and last tenth (a second at most).
        let mut middle = OpenLoopTiming::default();
        middle.lag(Stretch::Middle, ms(5));
        assert_eq!(middle.median_lag(Stretch::First), None);
        assert_eq!(middle.median_lag(Stretch::Last), None);
        assert_eq!(
            open_loop_stretch(start + ms(599), start, deadline),
            Stretch::First
        );
        assert_eq!(
            open_loop_stretch(start + ms(600), start, deadline),
            Stretch::Middle
        );
        assert_eq!(
            open_loop_stretch(start + ms(5400), start, deadline),
            Stretch::Last
        );
        let long = start + ms(60_000);
        assert_eq!(
            open_loop_stretch(start + ms(1500), start, long),
            Stretch::Middle
        );
    }

    /// A load write shed or timed out is tried again, as an overwrite, up
    /// to three times; one refused for another reason is not.
    #[tokio::test]
    async fn a_load_write_is_retried_only_while_shed_or_timed_out() {
        let written = || Outcome::Written {
            context: None,
            coordinator: None,
        };
        let run = |answers: Vec<Outcome>| async move {
            let (answers, tries) = (
                std::sync::Mutex::new(answers.into_iter()),
                std::sync::Mutex::new(Vec::new()),
            );
            let outcome = with_load_retries(|retry| {
                tries.lock().unwrap().push(retry);
                let next = answers.lock().unwrap().next().unwrap();
                async move { next }
            })
            .await;
            (outcome, tries.into_inner().unwrap())
        };
        let (outcome, tries) = run(vec![Outcome::Shed, Outcome::Timeout, written()]).await;
        assert!(outcome.is_ok());
        assert_eq!(tries, [false, true, true]);
        let error = || Outcome::Error {
            reason: "too big".into(),
        };
        let (outcome, tries) = run(vec![error()]).await;
        assert!(matches!(outcome, Outcome::Error { .. }));
        assert_eq!(tries, [false], "a refusal is not retried");
        let (outcome, tries) = run((0..4).map(|_| Outcome::Shed).collect()).await;
        assert!(matches!(outcome, Outcome::Shed));
        assert_eq!(tries.len(), 4, "three tries again, then it fails");
    }

    /// Each prober writes and reads through two different coordinators, and
    /// together they cover several pairs; with more probers than
    /// coordinators, every neighbouring pair round the list.
    #[test]
    fn probers_cover_several_pairs_of_coordinators() {
        let pairs =
            |probers: usize, n: usize| (0..probers).map(|p| prober_pair(p, n)).collect::<Vec<_>>();
        assert_eq!(pairs(4, 2), [(0, 1), (1, 0), (0, 1), (1, 0)]);
        assert_eq!(pairs(4, 5), [(0, 1), (1, 2), (2, 3), (3, 4)]);
        let round: std::collections::BTreeSet<_> =
            pairs(PROBERS_ACROSS_REGIONS, 5).into_iter().collect();
        assert_eq!(
            round.into_iter().collect::<Vec<_>>(),
            [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)]
        );
        for probers in [1, PROBERS_DEFAULT, PROBERS_ACROSS_REGIONS, PROBERS_MAX] {
            for n in 2..=probers + 1 {
                let all = pairs(probers, n);
                assert_eq!(all.len(), probers);
                assert!(all.iter().all(|(w, r)| w != r && *w < n && *r < n));
            }
        }
    }

    /// A timed-out request is in the latencies at the time the client gave
    /// up (the worst a user waited); one the store refused or shed is not,
    /// but in the failures' latencies, apart.
    #[test]
    fn timeouts_count_in_the_latencies_and_refusals_apart() {
        let mut report = OpReport::new();
        let written = || Outcome::Written {
            context: None,
            coordinator: None,
        };
        report.count(written(), 1_000);
        report.count(Outcome::Timeout, 3_000_000);
        report.count(Outcome::Shed, 5);
        report.count(
            Outcome::Error {
                reason: "first".into(),
            },
            7,
        );
        report.count(
            Outcome::Error {
                reason: "second".into(),
            },
            7,
        );
        assert_eq!(
            (report.ops, report.timeouts, report.shed, report.errors),
            (1, 1, 1, 2)
        );
        assert_eq!(report.first_error.as_deref(), Some("first"));
        assert_eq!(report.latency_us.len(), 2);
        assert!(report.latency_ms(1.0).unwrap() >= 2_990.0);
        assert!(report.latency_ms(0.0).unwrap() <= 1.01);
        // The refusals have latencies of their own, apart.
        let failed = report.failed_latency_us.as_ref().unwrap();
        assert_eq!(failed.len(), 3, "one shed, two errors");
        assert_eq!(crate::quantile_ms(failed, 1.0), Some(0.007));
        assert_eq!(crate::quantile_ms(failed, 0.0), Some(0.005));
        let mut merged = OpReport::new();
        assert!(merged.failed_latency_us.is_none(), "none failed");
        merged.merge(&report);
        merged.merge(&OpReport::new());
        assert_eq!(merged.failed_latency_us.as_ref().map(|h| h.len()), Some(3));
        // Past the histogram's bound: counted at the bound, not lost.
        report.count(written(), u64::MAX);
        assert_eq!(report.latency_us.len(), 3);
        assert_eq!(report.attempts(), 6);
    }

    /// A probe counts only if two nodes coordinated it: a read that the
    /// write's coordinator served (both requests forwarded to one replica)
    /// would always be fresh.
    #[test]
    fn a_probe_counts_only_between_two_coordinators() {
        let node = |n: &str| Some(NodeId::new(n).unwrap());
        let written = |by| Outcome::Written {
            context: None,
            coordinator: by,
        };
        let read = |values: &[&str], by| Outcome::Read {
            values: values.iter().map(|v| v.as_bytes().to_vec()).collect(),
            context: None,
            coordinator: by,
        };
        let v = b"v1";
        assert_eq!(
            verdict(&written(node("a")), &read(&["v1"], node("b")), v),
            Verdict::Fresh
        );
        assert_eq!(
            verdict(&written(node("a")), &read(&["v0"], node("b")), v),
            Verdict::Stale
        );
        assert_eq!(
            verdict(&written(node("a")), &read(&[], node("b")), v),
            Verdict::Stale
        );
        assert_eq!(
            verdict(&written(node("a")), &read(&["v1"], node("a")), v),
            Verdict::SameCoordinator
        );
        assert_eq!(
            verdict(&written(None), &read(&["v1"], None), v),
            Verdict::Fresh,
            "no receipts"
        );
        assert_eq!(
            verdict(&Outcome::Timeout, &read(&["v1"], node("b")), v),
            Verdict::Failed
        );
        assert_eq!(
            verdict(&written(node("a")), &Outcome::Timeout, v),
            Verdict::Failed
        );
    }

    /// Reads reach a record only once every insert up to it is over, failed
    /// or not, whatever order the inserts end in.
    #[test]
    fn inserted_records_are_readable_once_every_earlier_insert_is_over() {
        let inserts = Inserts::new(10);
        let (a, b, c) = (inserts.take(), inserts.take(), inserts.take());
        assert_eq!((a, b, c, inserts.taken()), (10, 11, 12, 13));
        assert_eq!(inserts.acknowledged(), 10);
        inserts.finish(b);
        assert_eq!(inserts.acknowledged(), 10, "11 is over, but 10 is not");
        inserts.finish(a);
        assert_eq!(inserts.acknowledged(), 12);
        inserts.finish(c);
        assert_eq!(inserts.acknowledged(), 13);
    }

    /// Many clients inserting at once: in the end every number is readable,
    /// and at no point is one readable whose insert was not over.
    #[test]
    fn concurrent_inserts_never_expose_a_record_still_being_inserted() {
        let inserts = Arc::new(Inserts::new(0));
        let over: Arc<Vec<std::sync::atomic::AtomicBool>> =
            Arc::new((0..4000).map(|_| false.into()).collect());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (inserts, over) = (inserts.clone(), over.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let record = inserts.take();
                        over[record as usize].store(true, std::sync::atomic::Ordering::Release);
                        inserts.finish(record);
                        let readable = inserts.acknowledged();
                        for r in readable.saturating_sub(8)..readable {
                            assert!(over[r as usize].load(std::sync::atomic::Ordering::Acquire));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(inserts.acknowledged(), 4000);
    }

    /// The open loop's requests never sent count as timeouts of the mix's
    /// operations, each at what it had waited when the clients stopped.
    #[test]
    fn unsent_requests_count_as_timeouts_at_their_wait() {
        let mut ops = vec![(Op::Read, OpReport::new())];
        ops[0].1.ops = 5;
        // 1,000/s: requests 990..1000 were due at 0.990..0.999 s; the
        // clients stopped taking them at 1.5 s.
        charge_unsent(
            &mut ops,
            Workload::A,
            1000,
            7,
            990..1000,
            Duration::from_millis(1500),
        );
        let timeouts: u64 = ops.iter().map(|(_, o)| o.timeouts).sum();
        assert_eq!(timeouts, 10);
        assert_eq!(ops[0].1.ops, 5, "answers untouched");
        let names: Vec<&str> = ops.iter().map(|(op, _)| op.as_str()).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted: {names:?}");
        for (op, o) in &ops {
            assert_eq!(o.latency_us.len(), o.timeouts, "{op:?}");
            if o.timeouts > 0 {
                assert!(o.latency_us.min() >= 500_000, "{op:?}");
                assert!(o.latency_us.max() <= 511_000, "{op:?}");
            }
        }
    }

    /// Far more unsent requests than draws: each draw stands for a run, and
    /// every request is still counted, at about its wait.
    #[test]
    fn a_huge_backlog_of_unsent_requests_is_charged_in_runs() {
        let mut ops = Vec::new();
        let (rate, due) = (10_000_000, 10_000_000 * 86_400);
        let started = Instant::now();
        charge_unsent(
            &mut ops,
            Workload::A,
            rate,
            7,
            0..due,
            Duration::from_secs(86_401),
        );
        assert!(started.elapsed() < Duration::from_secs(20), "in runs");
        let timeouts: u64 = ops.iter().map(|(_, o)| o.timeouts).sum();
        assert_eq!(timeouts, due, "every request counted");
        let recorded: u64 = ops.iter().map(|(_, o)| o.latency_us.len()).sum();
        assert_eq!(recorded, due);
        let (read, update) = (&ops[0].1, &ops[1].1);
        assert_eq!((ops[0].0, ops[1].0), (Op::Read, Op::Update));
        // A is half reads, half updates.
        let share = read.timeouts as f64 / due as f64;
        assert!((share - 0.5).abs() < 0.01, "{share}");
        for o in [read, update] {
            // Waits run from 1 s (the last due) to 86,401 s (the first);
            // a run of draws stands for 86.4 ms of the schedule.
            let shortest = o.latency_ms(0.0).unwrap();
            assert!((1_000.0..2_000.0).contains(&shortest), "{shortest}");
            // Beyond the histogram's 60 s bound: counted at the bound.
            assert!(o.latency_ms(1.0).unwrap() >= 59_000.0);
        }
    }

    /// CPU per operation divides by what succeeded, so a store that sheds
    /// or fails requests does not look cheaper for it; per request sent
    /// divides by every request that left, and none that never did.
    #[test]
    fn cpu_per_operation_counts_only_what_succeeded() {
        let mut read = OpReport::new();
        (read.ops, read.errors, read.shed, read.timeouts) = (100, 50, 30, 20);
        let mut report = SettingReport::for_tests(vec![(Op::Read, read)]);
        report.cpu = Some(Duration::from_millis(10));
        report.rate_per_s = Some(200);
        report.unsent = Some(5);
        (report.reads, report.values_read) = (100, 100);
        assert_eq!(report.cpu_us_per_op(), Some(100.0));
        // 200 attempts, 5 of them counted but never sent.
        assert_eq!(report.cpu_us_per_attempt(), Some(10_000.0 / 195.0));
        // The machine's busy time divides by the same successes.
        assert_eq!(report.machine_cpu_us_per_op(), None, "no reading");
        report.machine = Some(MachineShare {
            busy_pct: 50.0,
            steal_pct: 0.0,
            busy: Duration::from_millis(30),
            idle_poll_pct: None,
        });
        assert_eq!(report.machine_cpu_us_per_op(), Some(300.0));
        report.ops[0].1.ops = 0;
        assert_eq!(report.cpu_us_per_op(), None, "nothing succeeded");
        report.cpu = None;
        assert_eq!(report.cpu_us_per_attempt(), None, "CPU unreadable");
    }

    /// Each kind of answer lands in its own column: a node shedding load
    /// is neither a failure nor a timeout, and a quorum failure is a
    /// timeout only if a replica did not answer in time.
    #[test]
    fn answers_are_counted_by_kind() {
        use ringkv_core::wire::{Receipt, ReplicaOutcome};
        let error = |kind, receipt: Option<Vec<ReplicaAnswer>>| {
            let receipt = receipt.map(|outcomes| Receipt {
                coordinator: None,
                replicas: outcomes
                    .into_iter()
                    .map(|outcome| ReplicaOutcome {
                        node: ringkv_core::NodeId::new("n1").unwrap(),
                        outcome,
                        latency_us: 0,
                        detail: None,
                        hint_for: None,
                    })
                    .collect(),
            });
            outcome_of(Ok(Response::Error(ErrorReply {
                kind,
                message: "why".into(),
                receipt,
            })))
        };
        use ReplicaAnswer::{Error as Failed, Ok as Answered, Timeout as Late};
        assert!(matches!(error(ErrorKind::Overloaded, None), Outcome::Shed));
        assert!(matches!(
            error(
                ErrorKind::QuorumNotReached,
                Some(vec![Answered, Late, Failed])
            ),
            Outcome::Timeout
        ));
        assert!(matches!(
            error(ErrorKind::QuorumNotReached, None),
            Outcome::Timeout
        ));
        assert!(matches!(
            error(ErrorKind::QuorumNotReached, Some(vec![Answered, Failed, Failed])),
            Outcome::Error { reason } if reason == "why"
        ));
        assert!(matches!(
            error(ErrorKind::Refused, None),
            Outcome::Error { reason } if reason == "why"
        ));
    }
}
