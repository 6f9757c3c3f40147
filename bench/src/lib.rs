//! Load generation and latency measurement against a ringkv cluster.
//!
//! [`run`] drives a closed loop: `concurrency` clients, each with its own QUIC
//! connection to one of the target nodes (round-robin; a `ClusterClient`
//! that moves to another target while its own cannot serve), each issuing its next
//! request as soon as the previous one is answered. A put phase inserts new
//! keys (unique to the run and the client, so no put ever creates a sibling
//! and the figures measure quorum writes, not sibling growth), then a get
//! phase reads those keys back; each runs for a fixed duration, so put and get
//! latencies and throughputs are measured separately. Latencies go into
//! HdrHistograms (microsecond resolution, 3 significant digits).
//!
//! This is the seed of `ringkv bench`; workloads, open-loop load, emulated
//! regions and staleness measurement build on it.

mod direct;
pub mod machine_cpu;
pub mod pacer;
pub mod plot;
pub mod predict;
pub mod rate;
pub mod resp;
pub mod share_interval;
pub mod workload;
pub mod ycsb;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The latency histograms of every report.
pub use hdrhistogram::Histogram;
use ringkv_core::dvv::Payload;
use ringkv_core::wire::{GetRequest, PutRequest, Request};
use ringkv_core::Consistency;
use ringkv_node::{ClusterClient, ClusterKey};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub targets: Vec<SocketAddr>,
    pub concurrency: usize,
    /// How long each phase (put, then get) runs.
    pub phase_duration: Duration,
    pub value_bytes: usize,
    pub r: Consistency,
    pub w: Consistency,
    pub request_timeout_ms: u32,
    /// The cluster's key, if it has one.
    pub cluster_key: Option<ClusterKey>,
}

/// User plus system CPU time of this process so far, all threads
/// (`getrusage`); `None` if the OS does not say.
pub fn process_cpu() -> Option<Duration> {
    // SAFETY: getrusage only writes the struct it is handed.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    Some(time(usage.ru_utime) + time(usage.ru_stime))
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("nothing to run against: no target nodes")]
    NoTargets,
    #[error("--concurrency must be at least 1")]
    NoConcurrency,
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("{failed} writes of the load phase failed, the first with: {first}")]
    LoadFailed { failed: u64, first: String },
    #[error("cannot start the open loop's pacer thread: {source}")]
    Pacer { source: std::io::Error },
    /// A client task ended without its report (it panicked): the figures
    /// would silently leave its requests out.
    #[error("a bench client failed: {reason}")]
    ClientFailed { reason: String },
    /// `--client-reads` could not learn the cluster's placement.
    #[error("client-driven reads: {reason}")]
    ClientReads { reason: String },
}

/// The outcome of one phase: its requests counted as the YCSB runs count
/// them (timeouts in the latencies, see [`ycsb::OpReport`]).
#[derive(Debug, Clone)]
pub struct PhaseReport {
    pub counts: ycsb::OpReport,
    pub elapsed: Duration,
    /// Gets answered with no value (counted in `counts.ops` too): every key
    /// read was written, so each is a put that failed, a read that missed
    /// a write (R + W <= N), or a lost write.
    pub not_found: u64,
}

/// `count` operations over `window`, per second (0 over an empty window).
/// Every ops/s the bench reports comes from here.
pub fn per_second(count: u64, window: Duration) -> f64 {
    if window.is_zero() {
        return 0.0;
    }
    count as f64 / window.as_secs_f64()
}

impl PhaseReport {
    pub fn ops_per_sec(&self) -> f64 {
        per_second(self.counts.ops, self.elapsed)
    }

    /// The `q` quantile (0..=1) of latency, in milliseconds; `None` with
    /// none recorded.
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        self.counts.latency_ms(q)
    }
}

/// The `q` quantile (0..=1; 1 is the maximum) of a histogram of
/// microseconds, in milliseconds; `None` if it is empty, where a quantile
/// would read as 0 ms.
pub fn quantile_ms(latency_us: &Histogram<u64>, q: f64) -> Option<f64> {
    (!latency_us.is_empty()).then(|| latency_us.value_at_quantile(q) as f64 / 1000.0)
}

#[derive(Debug, Clone)]
pub struct Report {
    pub put: PhaseReport,
    pub get: PhaseReport,
    /// Times a client moved to another node because its own could not take
    /// requests (`ClusterClient::failovers`), over both phases.
    pub failovers: u64,
}

/// How often a phase reports its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy)]
enum Op {
    Put,
    Get,
}

/// Runs the put phase, then the get phase. `progress(phase, share)` is told,
/// about ten times a second, which phase runs ("put", "get") and how much of
/// its duration has passed (0.0 to 1.0).
pub async fn run(
    config: &LoadConfig,
    progress: &(dyn Fn(&str, f64) + Sync),
) -> Result<Report, BenchError> {
    if config.concurrency == 0 {
        return Err(BenchError::NoConcurrency);
    }
    let clients = connect_clients(
        &config.targets,
        config.concurrency,
        config.cluster_key.as_ref(),
    )
    .await?;
    let run_id: u32 = rand_run_id();
    let (put, written) = phase(config, &clients, Op::Put, run_id, &[], progress).await?;
    let (get, _) = phase(config, &clients, Op::Get, run_id, &written, progress).await?;
    let failovers = clients.iter().map(|c| c.failovers()).sum();
    ClusterClient::close_all(clients.into_iter().filter_map(std::sync::Arc::into_inner)).await;
    Ok(Report {
        put,
        get,
        failovers,
    })
}

/// `count` clients, each with its own connection, round-robin over `targets`.
/// Each moves to the next target while its own cannot take requests (see
/// `ringkv_node::cluster_client`), so a node stopped mid-run costs only the
/// requests under way on it. They connect at once, not one after another:
/// those whose node is down wait out a connect timeout before they settle
/// on the next, and one at a time that would add up.
pub(crate) async fn connect_clients(
    targets: &[SocketAddr],
    count: usize,
    cluster_key: Option<&ClusterKey>,
) -> Result<Vec<std::sync::Arc<ClusterClient>>, BenchError> {
    if targets.is_empty() {
        return Err(BenchError::NoTargets);
    }
    let mut connecting = tokio::task::JoinSet::new();
    for i in 0..count {
        let (targets, key) = (targets.to_vec(), cluster_key.cloned());
        connecting.spawn(async move {
            let addr = targets[i % targets.len()];
            let connected =
                ClusterClient::connect(targets, i, Duration::from_secs(3), key.as_ref()).await;
            (i, addr, connected)
        });
    }
    let mut clients: Vec<Option<std::sync::Arc<ClusterClient>>> =
        (0..count).map(|_| None).collect();
    let mut failure = None;
    while let Some(done) = connecting.join_next().await {
        let (i, addr, connected) = match done {
            Ok(done) => done,
            Err(e) => {
                failure.get_or_insert(BenchError::Unreachable {
                    addr: targets[0],
                    reason: format!("a connecting task failed: {e}"),
                });
                continue;
            }
        };
        match connected {
            Ok(client) => clients[i] = Some(std::sync::Arc::new(client)),
            Err(e) => {
                failure.get_or_insert(BenchError::Unreachable {
                    addr,
                    reason: e.to_string(),
                });
            }
        }
    }
    match failure {
        Some(e) => {
            ClusterClient::close_all(
                clients
                    .into_iter()
                    .flatten()
                    .filter_map(std::sync::Arc::into_inner),
            )
            .await;
            Err(e)
        }
        None => Ok(clients.into_iter().flatten().collect()),
    }
}

/// A run id from the clock: distinct between runs against one cluster.
fn rand_run_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (nanos.as_nanos() as u32) ^ std::process::id().rotate_left(16)
}

/// Runs one phase. Puts insert `bench:{run}:{worker}:{i}` for i = 0, 1, …
/// and report how many each worker wrote; gets cycle through those keys.
/// A failed put's key is tried again by the worker's next put, so the keys
/// a worker reports written are exactly its first ones.
async fn phase(
    config: &LoadConfig,
    clients: &[std::sync::Arc<ClusterClient>],
    op: Op,
    run_id: u32,
    written: &[u64],
    progress: &(dyn Fn(&str, f64) + Sync),
) -> Result<(PhaseReport, Vec<u64>), BenchError> {
    let started = Instant::now();
    let deadline = started + config.phase_duration;
    let mut workers = tokio::task::JoinSet::new();
    for (worker, client) in clients.iter().enumerate() {
        let client = client.clone();
        let config = config.clone();
        // A worker reads its own keys back, or, if its puts all failed,
        // those of one that wrote some (reads of keys never written would
        // count as fast answers).
        let (owner, readable) = match written.get(worker).copied().unwrap_or(0) {
            0 => written
                .iter()
                .enumerate()
                .find(|(_, n)| **n > 0)
                .map_or((worker, 0), |(w, n)| (w, *n)),
            n => (worker, n),
        };
        workers.spawn(async move {
            let mut counts = ycsb::OpReport::new();
            let value = vec![b'v'; config.value_bytes];
            let mut next = 0u64;
            // After a failed put, its key is written again; the failed one
            // may have landed, so the next replaces it rather than add a
            // sibling beside it.
            let mut retrying = false;
            let mut not_found = 0u64;
            while Instant::now() < deadline {
                let i = match op {
                    Op::Put => counts.ops,
                    Op::Get => next % readable.max(1),
                };
                let key = match op {
                    Op::Put => format!("bench:{run_id:08x}:{worker}:{i}"),
                    Op::Get => format!("bench:{run_id:08x}:{owner}:{i}"),
                }
                .into_bytes();
                next += 1;
                let request = match op {
                    Op::Put => Request::Put(PutRequest {
                        timeout_ms: config.request_timeout_ms,
                        overwrite: retrying,
                        ..PutRequest::new(key, Payload::Value(value.clone()), config.w, None)
                    }),
                    Op::Get => Request::Get(GetRequest {
                        timeout_ms: config.request_timeout_ms,
                        ..GetRequest::new(key, config.r)
                    }),
                };
                let sent = Instant::now();
                let answer = client
                    .call_within(&request, ycsb::answer_limit(&request))
                    .await;
                let outcome = ycsb::outcome_of(answer);
                if matches!(&outcome, ycsb::Outcome::Read { values, .. } if values.is_empty()) {
                    not_found += 1;
                }
                retrying = !matches!(outcome, ycsb::Outcome::Written { .. });
                counts.count(outcome, sent.elapsed().as_micros() as u64);
            }
            (worker, counts, not_found)
        });
    }
    let mut report = PhaseReport {
        counts: ycsb::OpReport::new(),
        elapsed: Duration::ZERO,
        not_found: 0,
    };
    let mut written_now = vec![0u64; clients.len()];
    let name = match op {
        Op::Put => "put",
        Op::Get => "get",
    };
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let joined = tokio::select! {
            joined = workers.join_next() => match joined {
                Some(joined) => joined,
                None => break,
            },
            _ = tick.tick() => {
                let share = started.elapsed().as_secs_f64() / config.phase_duration.as_secs_f64();
                progress(name, share.min(1.0));
                continue;
            }
        };
        // A client that panicked took its requests with it: the figures
        // would silently leave them out.
        let (worker, counts, not_found) = joined.map_err(|e| BenchError::ClientFailed {
            reason: e.to_string(),
        })?;
        report.not_found += not_found;
        // Puts write keys 0, 1, … and retry a failed one: a worker's
        // successes are exactly its first keys.
        written_now[worker] = counts.ops;
        report.counts.merge(&counts);
    }
    // The requests counted were sent in the phase: divided by it, not by
    // the time to the last answer (which adds the slowest one's tail).
    report.elapsed = config.phase_duration;
    Ok((report, written_now))
}

/// The longest latency a histogram tells apart, in microseconds: 60 s.
/// Longer ones (an open loop far behind its rate) count as 60 s.
pub(crate) const LATENCY_MAX_US: u64 = 60_000_000;

/// Latencies in microseconds, from 1 µs to [`LATENCY_MAX_US`] at 3
/// significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")
}

/// Records `count` latencies of `latency_us`, those over [`LATENCY_MAX_US`]
/// as that. (The histogram itself keeps values up to the end of its last
/// bucket, 67 s, and clamps only beyond: a 65 s latency would show above a
/// two-hour one.)
pub(crate) fn record_latency(histogram: &mut Histogram<u64>, latency_us: u64, count: u64) {
    histogram.saturating_record_n(latency_us.min(LATENCY_MAX_US), count);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Latencies past the bound all read as the bound, in order: none
    /// above another longer one.
    #[test]
    fn latencies_past_the_bound_count_as_the_bound() {
        // 60 s as the histogram tells it (to 3 significant digits).
        let near_60_s = |ms: Option<f64>| (ms.unwrap() - 60_000.0).abs() < 60.0;
        let mut h = new_histogram();
        record_latency(&mut h, 65_000_000, 1);
        assert!(
            near_60_s(quantile_ms(&h, 1.0)),
            "{:?}",
            quantile_ms(&h, 1.0)
        );
        record_latency(&mut h, 7_200_000_000, 2);
        assert_eq!(h.len(), 3);
        assert!(near_60_s(quantile_ms(&h, 0.0)) && near_60_s(quantile_ms(&h, 1.0)));
    }

    /// No latency recorded reads as none, not as 0 ms.
    #[test]
    fn an_empty_histogram_has_no_quantiles() {
        let mut h = new_histogram();
        assert_eq!(quantile_ms(&h, 0.5), None);
        h.record(1000).unwrap();
        h.record(2000).unwrap();
        assert_eq!(quantile_ms(&h, 0.5), Some(1.0));
        assert_eq!(quantile_ms(&h, 1.0), Some(2.0));
    }
}
