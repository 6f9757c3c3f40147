//! The YCSB run: load `records` keys, then for each consistency setting run
//! the workload's operation mix for a while and measure latency per
//! operation type, errors, timeouts, siblings and staleness.
//!
//! **Clients.** `concurrency` clients, each with its own QUIC connection to
//! one target (round-robin). In a closed loop a client sends its next
//! request when the last is answered. In an open loop (`rate_per_s`) each
//! sends on a fixed schedule, and a request's latency counts from when it
//! was due, so a stall shows up in every request queued behind it instead of
//! hiding as fewer requests (coordinated omission). With emulated regions, a client
//! sits in its coordinator's region, and the latency matrix's local delay
//! applies to its calls; nodes delay their calls to each other themselves
//! (`ringkv node --latency-matrix`).
//!
//! **Updates carry contexts.** A blind write in ringkv adds a sibling, so
//! YCSB's concurrent updates of hot keys would pile up siblings without
//! end. Each client remembers the context of the last version it saw of a
//! key (from a read or its own write) and writes with it, as an application
//! would. Concurrent updates from two clients still make siblings; the next
//! read sees them (counted as sibling reads) and the next update resolves them.
//!
//! **Staleness (PBS, Bailis et al., "Probabilistically Bounded Staleness
//! for Practical Partial Quorums", VLDB 2012).** Besides the clients, one
//! prober writes a fresh value through one coordinator, waits `t` after the
//! acknowledgement, and reads through *another* coordinator with the
//! setting's R. The read is fresh if it returns the value just written (or
//! a newer one: there is none, each probe key is written once). The share of
//! fresh reads per `t` is the t-visibility curve.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use ringkv_core::dvv::Payload;
use ringkv_core::wire::{ErrorKind, GetRequest, PutRequest, Request, Response};
use ringkv_core::Consistency;
use ringkv_node::Client;

use crate::workload::{record_key, KeyChooser, Op, Workload};
use crate::BenchError;

/// The waits after a write's acknowledgement at which staleness is probed, in ms.
pub const STALENESS_T_MS: &[u64] = &[0, 1, 5, 10, 50, 100];

/// One R/W choice to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub r: Consistency,
    pub w: Consistency,
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
    /// How long each setting's run phase lasts.
    pub duration: Duration,
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
}

/// Latencies and counts of one operation type.
#[derive(Debug, Clone)]
pub struct OpReport {
    pub ops: u64,
    pub errors: u64,
    pub timeouts: u64,
    /// Microseconds, successful operations only.
    pub latency_us: Histogram<u64>,
}

impl OpReport {
    fn new() -> Self {
        OpReport {
            ops: 0,
            errors: 0,
            timeouts: 0,
            latency_us: new_histogram(),
        }
    }

    fn merge(&mut self, other: &OpReport) {
        self.ops += other.ops;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        let _ = self.latency_us.add(&other.latency_us);
    }

    /// The `q` quantile (0..=1), in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Fresh reads out of probes at one `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Visibility {
    pub t_ms: u64,
    pub probes: u64,
    pub fresh: u64,
}

impl Visibility {
    /// The share of reads that saw the write (1 when nothing was probed).
    pub fn fresh_share(&self) -> f64 {
        if self.probes == 0 {
            1.0
        } else {
            self.fresh as f64 / self.probes as f64
        }
    }
}

/// One setting's results.
#[derive(Debug, Clone)]
pub struct SettingReport {
    pub setting: Setting,
    pub elapsed: Duration,
    pub ops: Vec<(Op, OpReport)>,
    pub reads: u64,
    /// Reads that returned more than one value.
    pub sibling_reads: u64,
    pub staleness: Vec<Visibility>,
}

impl SettingReport {
    pub fn total_ops(&self) -> u64 {
        self.ops.iter().map(|(_, r)| r.ops).sum()
    }

    pub fn ops_per_sec(&self) -> f64 {
        self.total_ops() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

async fn connect_all(config: &YcsbConfig, count: usize) -> Result<Vec<Arc<Client>>, BenchError> {
    crate::connect_clients(&config.targets, count).await
}

/// Writes records `0..records` at W=quorum; `progress(done)` after each.
pub async fn load(config: &YcsbConfig, progress: &(dyn Fn(u64) + Sync)) -> Result<(), BenchError> {
    let clients = connect_all(config, config.concurrency.max(1)).await?;
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let step = clients.len() as u64;
    for (w, client) in clients.iter().enumerate() {
        let (client, done, failed) = (client.clone(), done.clone(), failed.clone());
        let prefix = config.key_prefix.clone();
        let (records, value, timeout_ms) = (
            config.records,
            vec![b'v'; config.value_bytes],
            config.request_timeout_ms,
        );
        tasks.spawn(async move {
            for i in (w as u64..records).step_by(step as usize) {
                let put = Request::Put(PutRequest {
                    timeout_ms,
                    ..PutRequest::new(
                        record_key(&prefix, i),
                        Payload::Value(value.clone()),
                        Consistency::Quorum,
                        None,
                    )
                });
                if !matches!(client.call(&put).await, Ok(Response::Put(_))) {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    close_all(clients).await;
    match failed.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Ok(()),
        n => Err(BenchError::LoadFailed { failed: n }),
    }
}

async fn close_all(clients: Vec<Arc<Client>>) {
    for c in clients {
        if let Ok(c) = Arc::try_unwrap(c) {
            c.close().await;
        }
    }
}

/// What a client call came to.
enum Outcome {
    Ok(Response),
    Timeout,
    Error,
}

async fn call(client: &Client, request: &Request, delay: Duration) -> Outcome {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let answer = client.call(request).await;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match answer {
        Ok(Response::Error(e)) if e.kind == ErrorKind::QuorumNotReached => Outcome::Timeout,
        Ok(Response::Error(_)) | Err(_) => Outcome::Error,
        Ok(ok) => Outcome::Ok(ok),
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
    let started = Instant::now();
    let deadline = started + config.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (w, client) in clients.iter().enumerate() {
        let client = client.clone();
        let (config, setting) = (config.clone(), setting.clone());
        tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed ^ ((w as u64) << 32));
            let mut chooser = KeyChooser::new(config.workload.distribution(), records);
            let mut contexts: HashMap<u64, String> = HashMap::new();
            let mut reports: HashMap<Op, OpReport> = HashMap::new();
            let (mut reads, mut sibling_reads) = (0u64, 0u64);
            let value = vec![b'u'; config.value_bytes];
            // Open loop: this client's share of the rate, on a fixed schedule.
            let interval = config
                .rate_per_s
                .map(|rate| Duration::from_secs_f64(config.concurrency as f64 / rate as f64));
            let mut intended = Instant::now();
            while Instant::now() < deadline {
                if interval.is_some() {
                    // Sleep until the intended start; when behind, start at
                    // once and charge the wait to the request's latency.
                    tokio::time::sleep_until(intended.into()).await;
                    if intended >= deadline {
                        break;
                    }
                }
                let op = config.workload.next_op(&mut rng);
                let record = match op {
                    Op::Insert => chooser.next_insert(),
                    _ => chooser.next_existing(&mut rng),
                };
                let key = record_key(&config.key_prefix, record);
                let get = Request::Get(GetRequest {
                    timeout_ms: config.request_timeout_ms,
                    ..GetRequest::new(key.clone(), setting.r)
                });
                // Latency counts from the intended start in an open loop, so
                // queueing behind a slow request is not hidden (coordinated
                // omission); from the send in a closed loop.
                let sent = if interval.is_some() {
                    intended
                } else {
                    Instant::now()
                };
                if let Some(interval) = interval {
                    intended += interval;
                }
                let mut outcome = Outcome::Ok(Response::Pong);
                if matches!(op, Op::Read | Op::ReadModifyWrite) {
                    outcome = call(&client, &get, config.client_delay).await;
                    if let Outcome::Ok(Response::Get(reply)) = &outcome {
                        reads += 1;
                        if reply.values.len() > 1 {
                            sibling_reads += 1;
                        }
                        contexts.insert(record, reply.context.clone());
                    }
                }
                if matches!(op, Op::Update | Op::Insert | Op::ReadModifyWrite)
                    && matches!(outcome, Outcome::Ok(_))
                {
                    let put = Request::Put(PutRequest {
                        timeout_ms: config.request_timeout_ms,
                        ..PutRequest::new(
                            key,
                            Payload::Value(value.clone()),
                            setting.w,
                            contexts.get(&record).cloned(),
                        )
                    });
                    outcome = call(&client, &put, config.client_delay).await;
                    if let Outcome::Ok(Response::Put(reply)) = &outcome {
                        contexts.insert(record, reply.context.clone());
                    }
                }
                let report = reports.entry(op).or_insert_with(OpReport::new);
                match outcome {
                    Outcome::Ok(_) => {
                        report.ops += 1;
                        let _ = report.latency_us.record(sent.elapsed().as_micros() as u64);
                    }
                    Outcome::Timeout => report.timeouts += 1,
                    Outcome::Error => report.errors += 1,
                }
                // Bounded: forget contexts past a few thousand keys.
                if contexts.len() > 4096 {
                    contexts.clear();
                }
            }
            (reports, reads, sibling_reads)
        });
    }
    let prober = if config.targets.len() >= 2 {
        let (config, setting) = (config.clone(), setting.clone());
        Some(tokio::spawn(async move {
            probe_staleness(&config, &setting, deadline).await
        }))
    } else {
        None
    };
    let mut merged: HashMap<Op, OpReport> = HashMap::new();
    let (mut reads, mut sibling_reads) = (0, 0);
    while !tasks.is_empty() {
        tokio::select! {
            done = tasks.join_next() => {
                if let Some(Ok((reports, r, s))) = done {
                    for (op, report) in reports {
                        merged.entry(op).or_insert_with(OpReport::new).merge(&report);
                    }
                    reads += r;
                    sibling_reads += s;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        progress((started.elapsed().as_secs_f64() / config.duration.as_secs_f64()).min(1.0));
    }
    let elapsed = started.elapsed();
    let staleness = match prober {
        Some(p) => p.await.unwrap_or_default(),
        None => Vec::new(),
    };
    close_all(clients).await;
    let mut ops: Vec<(Op, OpReport)> = merged.into_iter().collect();
    ops.sort_by_key(|(op, _)| op.as_str());
    Ok(SettingReport {
        setting: setting.clone(),
        elapsed,
        ops,
        reads,
        sibling_reads,
        staleness,
    })
}

/// The staleness prober (see the module docs): writes through the first
/// target, reads through the second, cycling through [`STALENESS_T_MS`].
pub async fn probe_staleness(
    config: &YcsbConfig,
    setting: &Setting,
    until: Instant,
) -> Vec<Visibility> {
    let mut out: Vec<Visibility> = STALENESS_T_MS
        .iter()
        .map(|t| Visibility {
            t_ms: *t,
            ..Visibility::default()
        })
        .collect();
    let (Some(writer_addr), Some(reader_addr)) = (config.targets.first(), config.targets.get(1))
    else {
        return out;
    };
    let (Ok(writer), Ok(reader)) = (
        Client::connect(*writer_addr, Duration::from_secs(3)).await,
        Client::connect(*reader_addr, Duration::from_secs(3)).await,
    ) else {
        return out;
    };
    let run: u32 = rand::thread_rng().gen();
    let mut probe = 0u64;
    while Instant::now() < until {
        let slot = (probe as usize) % out.len();
        let key = format!("pbs:{run:08x}:{probe}");
        let value = format!("v{probe}").into_bytes();
        probe += 1;
        let put = Request::Put(PutRequest {
            timeout_ms: config.request_timeout_ms,
            ..PutRequest::new(key.clone(), Payload::Value(value.clone()), setting.w, None)
        });
        if !matches!(
            call(&writer, &put, config.client_delay).await,
            Outcome::Ok(Response::Put(_))
        ) {
            continue;
        }
        tokio::time::sleep(Duration::from_millis(out[slot].t_ms)).await;
        let get = Request::Get(GetRequest {
            timeout_ms: config.request_timeout_ms,
            ..GetRequest::new(key, setting.r)
        });
        if let Outcome::Ok(Response::Get(reply)) = call(&reader, &get, config.client_delay).await {
            out[slot].probes += 1;
            if reply.values.contains(&value) {
                out[slot].fresh += 1;
            }
        }
    }
    writer.close().await;
    reader.close().await;
    out
}
