//! `ringkv bench`: YCSB workloads at several consistency settings, side by
//! side, against an embedded cluster spread over emulated regions or a
//! running one; and the older put-then-get phases (`--workload putget`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use ringkv_bench::predict::{predict_p50, OpPrediction, Requests, Topology};
use ringkv_bench::rate::{share_of_peak, Rate};
use ringkv_bench::workload::{KeyDistribution, Workload};
use ringkv_bench::ycsb::{self, OpReport, Setting, SettingReport, YcsbConfig};
use ringkv_bench::{Histogram, LoadConfig, PhaseReport};
use ringkv_core::regions::{LatencyMatrix, Link};
use ringkv_core::wire::{NodeStatus, Request, Response, VALUE_MAX_BYTES};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Client, ClusterKey, NodeHandle};
use serde_json::json;

use crate::args::{BenchArgs, RATE_MAX};
use crate::client_cmd::resolve_addr;
use crate::server_cmd::{load_matrix, start_local_cluster_with};
use crate::{Exit, Failure};
use ringkv_bench::BenchError;

/// Nodes of the embedded cluster without --nodes: YCSB workloads spread
/// five over the matrix's regions; putget, the older benchmark, keeps three.
const EMBEDDED_NODES: usize = 5;
const PUTGET_NODES: usize = 3;
/// N of the embedded cluster.
const EMBEDDED_REPLICAS: usize = 3;
/// The longest `--duration-s`: past it a typo, not a run (and a deadline
/// that far off would overflow the clock).
const DURATION_MAX_S: u64 = 86_400;

/// `--warmup-s` when not given: long enough for connections, caches and a
/// first memtable, short against the default six-second settings.
const WARMUP_DEFAULT_S: u64 = 1;
/// The most clients: each keeps latency histograms of its own (about
/// 140 KiB per operation type), so past this a typo would fill memory.
const CONCURRENCY_MAX: usize = 10_000;
/// The most the clients' values may take together (`--value-bytes` ×
/// `--concurrency`; each client holds its value and a copy per request).
const CLIENT_VALUES_MAX_BYTES: usize = 4 << 30;

pub async fn bench(args: BenchArgs) -> Result<Exit, Failure> {
    if args.concurrency == 0 {
        return Err(Failure::new(
            Exit::Usage,
            "--concurrency must be at least 1",
        ));
    }
    if args.concurrency > CONCURRENCY_MAX {
        return Err(Failure::new(
            Exit::Usage,
            format!("--concurrency must be at most {CONCURRENCY_MAX}"),
        ));
    }
    if args.duration_s == 0 {
        return Err(Failure::new(Exit::Usage, "--duration-s must be at least 1"));
    }
    if args.duration_s > DURATION_MAX_S {
        return Err(Failure::new(
            Exit::Usage,
            format!("--duration-s must be at most {DURATION_MAX_S} (a day)"),
        ));
    }
    if args.warmup_s.is_some_and(|w| w > DURATION_MAX_S) {
        return Err(Failure::new(
            Exit::Usage,
            format!("--warmup-s must be at most {DURATION_MAX_S} (a day)"),
        ));
    }
    if args.value_bytes > VALUE_MAX_BYTES {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "--value-bytes must be at most {VALUE_MAX_BYTES} (64 MiB less room for a key's bookkeeping)"
            ),
        ));
    }
    if args.value_bytes.saturating_mul(2 * args.concurrency) > CLIENT_VALUES_MAX_BYTES {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "--value-bytes {} with --concurrency {} would hold {} MiB of values in the clients; the limit is {} MiB: lower one of them",
                args.value_bytes,
                args.concurrency,
                args.value_bytes.saturating_mul(2 * args.concurrency) >> 20,
                CLIENT_VALUES_MAX_BYTES >> 20
            ),
        ));
    }
    check_output_path("--plot", args.plot.as_deref())?;
    if let Some(path) = args.json.as_deref().filter(|p| *p != "-") {
        check_output_path("--json", Some(Path::new(path)))?;
        if let Some(plot) = args
            .plot
            .as_deref()
            .filter(|plot| same_file(plot, Path::new(path)))
        {
            return Err(Failure::new(
                Exit::Usage,
                format!(
                    "--json and --plot name the same file ({}): the plot would overwrite the JSON; give two paths",
                    plot.display()
                ),
            ));
        }
    }
    // Only the embedded cluster emulates regions from here: a matrix given
    // for anything else would be silently ignored.
    if let Some(source) = args.regions.as_deref().filter(|r| *r != "none") {
        let other = if !args.cluster.is_empty() {
            Some("--cluster: those nodes emulate regions themselves (ringkv node --latency-matrix)")
        } else if args.target.is_some() {
            Some("--target: the store there has no emulated regions")
        } else if args.workload == "putget" {
            Some("--workload putget, which runs without emulated regions")
        } else {
            None
        };
        if let Some(other) = other {
            return Err(Failure::new(
                Exit::Usage,
                format!("--regions {source} shapes the embedded cluster only, not with {other}"),
            ));
        }
    }
    // Read before anything starts, so a bad matrix costs no load.
    let matrix = match args.regions_source() {
        "none" => None,
        source => Some(Arc::new(load_matrix(source).map_err(|e| {
            Failure::new(e.exit, e.message.replace("--latency-matrix", "--regions"))
        })?)),
    };
    let distribution = args
        .request_distribution
        .as_deref()
        .map(str::parse::<KeyDistribution>)
        .transpose()
        .map_err(|e| Failure::new(Exit::Usage, format!("--request-distribution: {e}")))?;
    // A RESP target takes no cluster key: one named by the environment
    // for the ringkv cluster must not stop a Redis run.
    let cluster_key = if args.target.is_some() {
        None
    } else {
        crate::key_cmd::load(&args.key)?
    };
    if args.workload == "putget" {
        // putget is the older phase benchmark: ringkv only, no settings.
        let ycsb_only = [
            ("--rate", args.rate.is_some()),
            ("--target", args.target.is_some()),
            ("--plot", args.plot.is_some()),
            ("--consistency", !args.consistency.is_empty()),
            ("--request-distribution", distribution.is_some()),
            ("--warmup-s", args.warmup_s.is_some()),
            ("--probers", args.probers.is_some()),
            ("--client-reads", args.client_reads),
        ];
        if let Some((flag, _)) = ycsb_only.iter().find(|(_, given)| *given) {
            return Err(Failure::new(
                Exit::Usage,
                format!("{flag} works with YCSB workloads, not putget"),
            ));
        }
        return putget(args, cluster_key).await;
    }
    if let Some(flag) = [("-r", args.r.is_some()), ("-w", args.w.is_some())]
        .iter()
        .find_map(|(flag, given)| given.then_some(flag))
    {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "{flag} sets --workload putget's consistency; YCSB workloads take --consistency (e.g. --consistency r=2,w=2, or quorum)"
            ),
        ));
    }
    let workload: Workload =
        args.workload
            .parse()
            .map_err(|e: ringkv_bench::workload::WorkloadError| {
                Failure::new(Exit::Usage, format!("--workload: {e}"))
            })?;
    if let Some(target) = &args.target {
        return resp_bench(workload, target, &args, distribution).await;
    }
    let settings = parse_settings(&args.consistency)?;
    // --regions shapes the embedded cluster only: an external cluster's
    // nodes emulate regions themselves (ringkv node --latency-matrix).
    let matrix = matrix.filter(|_| args.cluster.is_empty());
    if args.client_reads && matrix.is_some() {
        // A leg to another region's replica would cross no emulated delay.
        return Err(Failure::new(
            Exit::Usage,
            "--client-reads is measured without emulated regions: add --regions none",
        ));
    }
    // A client sits in its coordinator's region: the matrix's local delay.
    let client_delay = matrix
        .as_ref()
        .and_then(|m| {
            let r = m.regions().first()?;
            m.link(r, r).ok()
        })
        .map_or(Duration::ZERO, |l| {
            Duration::from_secs_f64(l.delay_ms / 1000.0)
        });
    let embedded_dir = crate::server_cmd::scratch_dir("ringkv-bench");
    let (targets, embedded, shape, topology) = if args.cluster.is_empty() {
        check_settings(&settings, EMBEDDED_REPLICAS, "--consistency")?;
        let _ = std::fs::remove_dir_all(&embedded_dir);
        let regions: Vec<String> = matrix
            .as_ref()
            .map(|m| m.regions().to_vec())
            .unwrap_or_default();
        let nodes = start_local_cluster_with(
            embedded_nodes(&args, EMBEDDED_NODES),
            EMBEDDED_REPLICAS,
            0,
            &embedded_dir,
            false,
            |i, config| {
                config.max_value_bytes = config.max_value_bytes.max(args.value_bytes);
                config.cluster_key = cluster_key.clone();
                if let Some(m) = &matrix {
                    config.region = Some(embedded_region(&regions, i).to_string());
                    config.latency_matrix = Some(m.clone());
                }
            },
        )
        .await?;
        let shape = ClusterShape {
            replicas: EMBEDDED_REPLICAS,
            // Fewer nodes than the matrix has regions leave some empty.
            regions: regions.len().min(nodes.len()),
        };
        // The model weighs clients by a closed loop's pace (see predict).
        let topology = match &matrix {
            Some(m) if args.rate.is_none() => embedded_topology(&nodes, &regions, m, client_delay),
            _ => None,
        };
        (
            nodes.iter().map(|n| n.addr()).collect::<Vec<_>>(),
            nodes,
            shape,
            topology,
        )
    } else {
        let targets = resolve_cluster(&args.cluster)?;
        let shape = cluster_shape(&targets, cluster_key.as_ref()).await?;
        check_settings(&settings, shape.replicas, "--consistency")?;
        if args.client_reads && shape.regions > 1 {
            return Err(Failure::new(
                Exit::Usage,
                format!(
                    "--client-reads is measured within one region, and the --cluster members are in {}: a leg to another region's replica would not pay the delay a coordinator's read does",
                    shape.regions
                ),
            ));
        }
        (targets, Vec::new(), shape, None)
    };
    let config = YcsbConfig {
        client_delay,
        cluster_key,
        distribution,
        // Across regions (emulated or real) a probe takes a few hundred
        // ms: more probers, or too few probes per t for a short run's curve.
        probers: args.probers.unwrap_or(if shape.regions > 1 {
            ycsb::PROBERS_ACROSS_REGIONS
        } else {
            ycsb::PROBERS_DEFAULT
        }),
        ..ycsb_config(&args, workload, targets, settings, false)
    };
    // The embedded nodes are the targets, in order.
    let coordinators: Vec<(NodeId, usize)> = embedded
        .iter()
        .map(|n| n.id().clone())
        .zip(ycsb::clients_per_target(&config))
        .collect();
    let prediction = topology.as_ref().map(|t| (t, coordinators.as_slice()));
    let result = run_all(
        &config,
        &args,
        embedded.len(),
        &shape,
        matrix.as_deref(),
        prediction,
    )
    .await;
    for n in embedded {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&embedded_dir);
    result
}

/// The same workload against a RESP server (`--target resp://HOST:PORT`):
/// the no-replication baseline for comparison with peers.
async fn resp_bench(
    workload: Workload,
    target: &str,
    args: &BenchArgs,
    distribution: Option<KeyDistribution>,
) -> Result<Exit, Failure> {
    let bad = |why: &str| Failure::new(Exit::Usage, format!("--target {target:?}: {why}"));
    let Some(addr) = target.strip_prefix("resp://") else {
        return Err(bad("only resp://HOST:PORT targets are supported"));
    };
    // A cluster key (perhaps from the environment) has nothing to do with a
    // RESP store, and is not read.
    if !args.cluster.is_empty() || !args.consistency.is_empty() {
        return Err(bad(
            "--target replaces --cluster, and a RESP store has no --consistency",
        ));
    }
    let addr = resolve_addr("--target", addr).map_err(|e| Failure::new(Exit::Usage, e))?;
    let config = YcsbConfig {
        distribution,
        ..ycsb_config(args, workload, vec![addr], vec![Setting::RESP], true)
    };
    // A RESP store has no replicas but itself, and no regions.
    let shape = ClusterShape {
        replicas: 1,
        regions: 0,
    };
    run_all(&config, args, 0, &shape, None, None).await
}

/// The run the arguments describe, with no client delay and a fresh key space.
fn ycsb_config(
    args: &BenchArgs,
    workload: Workload,
    targets: Vec<std::net::SocketAddr>,
    settings: Vec<Setting>,
    resp: bool,
) -> YcsbConfig {
    YcsbConfig {
        targets,
        workload,
        records: args.records,
        value_bytes: args.value_bytes,
        concurrency: args.concurrency,
        // More connections than clients would sit unused.
        connections_per_target: (args.connections as usize).min(args.concurrency.max(1)),
        duration: Duration::from_secs(args.duration_s),
        warmup: Duration::from_secs(args.warmup_s.unwrap_or(WARMUP_DEFAULT_S)),
        settings,
        request_timeout_ms: 2000,
        seed: 0x5eed,
        client_delay: Duration::ZERO,
        key_prefix: format!("{:08x}:", rand::random::<u32>()),
        // A share of the peak becomes a rate per setting, in `run_all`.
        rate_per_s: args.rate.and_then(Rate::per_second),
        resp,
        updates: args.updates,
        cluster_key: None,
        distribution: None,
        // `bench` sets them; a RESP store has no coordinators to compare.
        probers: 0,
        client_reads: args.client_reads && !resp,
    }
}

/// Parses `--consistency`. Each value holds settings separated by commas:
/// one, quorum, all, a count (R = W), or a pair `r=R,w=W` (also written
/// `r=R:w=W`, and in either order). So `--consistency one,quorum` is two
/// settings and `--consistency r=1,w=2` one: a pair's two halves are read
/// together, as a setting prints itself.
fn parse_settings(raw: &[String]) -> Result<Vec<Setting>, Failure> {
    if raw.is_empty() {
        return Ok([Consistency::One, Consistency::Quorum, Consistency::All]
            .into_iter()
            .map(|c| Setting {
                r: c,
                w: c,
                resp: false,
            })
            .collect());
    }
    let level = |s: &str| {
        s.parse::<Consistency>()
            .map_err(|e| Failure::new(Exit::Usage, format!("--consistency {s:?}: {}", e.message)))
    };
    let mut settings = Vec::new();
    for value in raw {
        let bad = |why: &str| Failure::new(Exit::Usage, format!("--consistency {value:?}: {why}"));
        let mut parts = value.split([',', ':']).map(str::trim);
        while let Some(part) = parts.next() {
            if part.is_empty() {
                return Err(bad("has an empty setting"));
            }
            let setting = match half(part) {
                None => {
                    let c = level(part)?;
                    Setting {
                        r: c,
                        w: c,
                        resp: false,
                    }
                }
                Some((which, first)) => {
                    let other = parts.next().and_then(half);
                    let (r, w) =
                        match (which, other) {
                            ('r', Some(('w', w))) => (first, w),
                            ('w', Some(('r', r))) => (r, first),
                            _ => return Err(bad(
                                "a pair needs both halves, r= then w= (e.g. r=1,w=2 or r=1:w=2)",
                            )),
                        };
                    Setting {
                        r: level(r)?,
                        w: level(w)?,
                        resp: false,
                    }
                }
            };
            settings.push(setting);
        }
    }
    Ok(settings)
}

/// One half of a pair setting: `r=R` or `w=W`, as ('r', "R") or ('w', "W").
fn half(part: &str) -> Option<(char, &str)> {
    part.strip_prefix("r=")
        .map(|r| ('r', r))
        .or_else(|| part.strip_prefix("w=").map(|w| ('w', w)))
}

/// R and W above N cannot be met: refuse before loading anything.
fn check_settings(settings: &[Setting], replicas: usize, flag: &str) -> Result<(), Failure> {
    for s in settings {
        for (name, c) in [("R", s.r), ("W", s.w)] {
            if let Consistency::Count(n) = c {
                if n as usize > replicas {
                    return Err(Failure::new(
                        Exit::Usage,
                        format!("{flag} {s}: {name}={n} is above N={replicas}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// What the bench needs to know of a running cluster before it loads.
struct ClusterShape {
    /// N.
    replicas: usize,
    /// Distinct regions its serving members were started in (`--region`),
    /// as the `status` answers list them (see [`add_serving_regions`]); the
    /// embedded cluster's, its matrix's. Two or more: a probe crosses
    /// regions, and the bench runs more probers.
    regions: usize,
}

/// Adds to `regions` those of the members in a `status` answer's `nodes`
/// that serve requests: up, and not leaving. A member that is down or on
/// its way out takes no probe, so its region must not decide how many
/// run. A region is a name the node was given: the bench takes two names
/// to mean two places (emulated with `--latency-matrix`, or real).
fn add_serving_regions(regions: &mut BTreeSet<String>, nodes: Vec<NodeStatus>) {
    regions.extend(
        nodes
            .into_iter()
            .filter(|n| n.up && n.leaving != Some(true))
            .filter_map(|n| n.region),
    );
}

/// The shape of a running cluster, from the `status` of each of its
/// `targets`: every address must answer before anything is loaded (the
/// bench's clients move between them later, when one stops).
async fn cluster_shape(
    targets: &[std::net::SocketAddr],
    cluster_key: Option<&ClusterKey>,
) -> Result<ClusterShape, Failure> {
    let mut replicas = None;
    let mut regions = BTreeSet::new();
    for addr in targets {
        let unreachable =
            |e: String| Failure::new(Exit::Unreachable, format!("cannot reach {addr}: {e}"));
        let client = Client::connect_with_key(*addr, Duration::from_secs(3), cluster_key)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let answer = client.call(&Request::Status).await;
        client.close().await;
        match answer {
            Ok(Response::Status(s)) => {
                replicas.get_or_insert(s.replicas as usize);
                add_serving_regions(&mut regions, s.nodes);
            }
            // It answered: refused, shutting down, still joining. Its
            // error's kind picks the exit status, as for any command.
            Ok(refused @ Response::Error(_)) => {
                let mut failure = crate::client_cmd::answer_or_failure(Ok(refused))
                    .expect_err("an error answer is a failure");
                failure.message = format!("{addr}: {}", failure.message);
                return Err(failure);
            }
            Ok(other) => {
                let text = crate::output::debug_capped(&other, crate::output::ANSWER_SHOWN_CHARS);
                return Err(Failure::new(
                    Exit::Internal,
                    format!("{addr} gave an unexpected answer {text}"),
                ));
            }
            Err(e) => return Err(unreachable(e.to_string())),
        }
    }
    let replicas = replicas.ok_or_else(|| Failure::new(Exit::Usage, "--cluster names no node"))?;
    Ok(ClusterShape {
        replicas,
        regions: regions.len(),
    })
}

/// The exit status of a bench that could not finish: 4 only when a node
/// could not be reached (nothing was sent), as the README's table says.
fn bench_failure(e: BenchError) -> Failure {
    let exit = match &e {
        BenchError::NoTargets | BenchError::NoConcurrency => Exit::Usage,
        BenchError::Unreachable { .. } => Exit::Unreachable,
        // Writes were sent, and failed: timed out, shed, refused.
        BenchError::LoadFailed { .. } => Exit::Quorum,
        BenchError::Pacer { .. } | BenchError::ClientFailed { .. } => Exit::Internal,
        // The node asked for the members did not answer `status`, or
        // listed members no ring can be built of.
        BenchError::ClientReads { .. } => Exit::Internal,
    };
    Failure::new(exit, e.to_string())
}

/// Runs one setting under a progress bar named `what` and the setting.
async fn run_with_bar(
    config: &YcsbConfig,
    setting: &Setting,
    records: u64,
    what: &str,
) -> Result<SettingReport, Failure> {
    let running = bar(100, format!("{what} {setting}"));
    let report = ycsb::run_setting(config, setting, records, &|share| {
        running.set_position((share * 100.0) as u64)
    })
    .await
    .map_err(bench_failure)?;
    running.finish_and_clear();
    Ok(report)
}

fn bar(len: u64, message: String) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}

async fn run_all(
    config: &YcsbConfig,
    args: &BenchArgs,
    embedded_nodes: usize,
    shape: &ClusterShape,
    matrix: Option<&LatencyMatrix>,
    prediction: Option<(&Topology, &[(NodeId, usize)])>,
) -> Result<Exit, Failure> {
    let replicas = shape.replicas;
    let to_stdout = args.json.as_deref() == Some("-");
    if !to_stdout {
        errln!(
            "bench: YCSB-{} on {}{}, {} records of {} B, {} clients{}, {} s per setting after {} s of warm-up{}{}",
            config.workload,
            match (config.resp, embedded_nodes) {
                (true, _) => "the RESP store".to_string(),
                (false, 0) => "the given cluster".to_string(),
                (false, n) => format!("an embedded {n}-node cluster"),
            },
            if config.resp { String::new() } else { format!(", N={replicas}") },
            config.records,
            config.value_bytes,
            config.concurrency,
            if config.resp { String::new() } else { format!(" on {} connection(s) per node", config.connections_per_target) },
            config.duration.as_secs(),
            config.warmup.as_secs(),
            if matrix.is_some() { format!(", emulated regions ({})", args.regions_source()) } else { String::new() },
            match args.rate {
                None => String::new(),
                Some(Rate::PerSecond(rate)) => format!(", open loop at {rate} requests/s"),
                Some(Rate::ShareOfPeak { percent }) => format!(
                    ", open loop at {percent}% of each setting's peak (which a closed loop as long measures first)"
                ),
            },
        );
    }
    let loading = bar(config.records, "load".into());
    ycsb::load(config, &|done| loading.set_position(done))
        .await
        .map_err(bench_failure)?;
    loading.finish_and_clear();
    let mut reports = Vec::new();
    let mut records = config.records;
    for setting in &config.settings {
        let mut report = match args.rate {
            Some(Rate::ShareOfPeak { percent }) => {
                let peak = run_with_bar(config, setting, records, "peak").await?;
                // Inserts of workload D add records for the next run.
                records = peak.records_after;
                match share_of_peak(percent, peak.ops_per_sec(), RATE_MAX) {
                    Some(rate) => {
                        let open_loop = YcsbConfig {
                            rate_per_s: Some(rate),
                            ..config.clone()
                        };
                        let mut report = run_with_bar(&open_loop, setting, records, "run").await?;
                        report.peak = Some(Box::new(peak));
                        report
                    }
                    // Nothing got through, so there is no rate to take a
                    // share of: the peak run is the setting's report, and
                    // fails the command once every report is out.
                    None => peak,
                }
            }
            _ => run_with_bar(config, setting, records, "run").await?,
        };
        if let Some((topology, coordinators)) = prediction {
            let requests = Requests {
                coordinators,
                workload: config.workload,
                distribution: config
                    .distribution
                    .unwrap_or_else(|| config.workload.distribution()),
                records,
                records_after: report.records_after,
                key_prefix: &config.key_prefix,
                seed: config.seed,
            };
            // Checked against N before anything ran.
            if let (Ok(r), Ok(w)) = (setting.r.required(replicas), setting.w.required(replicas)) {
                // Thousands of preference lists (and, for `latest`, a
                // zipfian over the records): off the nodes' event loop.
                report.predicted_p50 =
                    tokio::task::block_in_place(|| predict_p50(topology, &requests, r, w));
            }
        }
        records = report.records_after;
        reports.push(report);
    }
    // What the CPU time of this process covers: with an embedded cluster
    // the nodes run here too, so it is the whole cost of an operation;
    // against a cluster elsewhere it is the clients' share only. The
    // staleness probers (up to about 70 requests/s each, not counted as
    // operations) run whenever there are two coordinators to compare.
    let probing = reports.iter().any(|r| r.staleness_skipped.is_none());
    let cpu_scope = match (embedded_nodes == 0, probing) {
        (true, false) => "this process: the bench's clients",
        (true, true) => "this process: the bench's clients and its staleness probes",
        (false, false) => "this process: the embedded nodes and the bench's clients",
        (false, true) => {
            "this process: the embedded nodes, the bench's clients and its staleness probes"
        }
    };
    // The results first: a plot that cannot be written must not lose them.
    let out = report_json(
        config,
        args,
        embedded_nodes,
        matrix,
        shape,
        &reports,
        cpu_scope,
    );
    // Files before the table: a closed or full stdout (`| head`) ends the
    // process mid-table, and must not lose the files asked for.
    let json_written = match args.json.as_deref() {
        Some("-") => {
            outln!("{out}");
            Ok(())
        }
        Some(path) => write_whole(Path::new(path), format!("{out:#}\n").as_bytes()).map_err(|e| {
            Failure::new(Exit::Output, format!("--json {path}: cannot write it: {e}"))
        }),
        None => Ok(()),
    };
    let plotted = plot_file(args, &reports);
    if args.json.as_deref() != Some("-") {
        print_table(&reports, cpu_scope, args.concurrency, args.rate);
    }
    json_written?;
    let after_json = |failure: Failure| match args.json.as_deref() {
        Some("-") => failure.after_json(),
        _ => failure,
    };
    if let Err(failure) = plotted {
        return Err(after_json(failure));
    }
    if let Some(r) = reports
        .iter()
        .find(|r| r.attempts() > 0 && r.total_ops() == 0)
    {
        // A run that measured nothing is no result a script should take.
        let share = match args.rate {
            Some(Rate::ShareOfPeak { percent }) => format!(
                " in the closed loop that measures its peak, so there was no rate to run at {percent}% of it"
            ),
            _ => String::new(),
        };
        return Err(after_json(Failure::new(
            Exit::Quorum,
            format!(
                "setting {}: none of its {} requests succeeded{share} (see the errors above)",
                r.setting,
                r.attempts()
            ),
        )));
    }
    Ok(Exit::Ok)
}

/// Writes `--plot`'s SVG, if asked for.
fn plot_file(args: &BenchArgs, reports: &[SettingReport]) -> Result<(), Failure> {
    let Some(path) = &args.plot else {
        return Ok(());
    };
    let svg = ringkv_bench::plot::render_svg(reports)
        .map_err(|e| Failure::new(Exit::Internal, format!("--plot: {e}")))?;
    write_whole(path, svg.as_bytes()).map_err(|e| {
        Failure::new(
            Exit::Output,
            format!("--plot {}: cannot write it: {e}", path.display()),
        )
    })
}

/// The table, and what to note about it. `clients`: `--concurrency`;
/// `rate`: `--rate`, as given.
fn print_table(reports: &[SettingReport], cpu_scope: &str, clients: usize, rate: Option<Rate>) {
    outln!("{:<16} {:<7} {}", "setting", "op", op_columns_header());
    for r in reports {
        for (op, o) in &r.ops {
            outln!(
                "{:<16} {:<7} {}",
                r.setting.to_string(),
                op.as_str(),
                op_columns(o, r.op_ops_per_sec(o), 2)
            );
        }
    }
    predicted_line(reports);
    let per_op: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            // Failures cost CPU too, but dividing by them flatters a store
            // that refuses work: name both when they differ (and what was
            // sent cost, when nothing succeeded).
            let per_attempt = r
                .cpu_us_per_attempt()
                .filter(|_| r.total_ops() < r.attempts());
            let shown = match (r.cpu_us_per_op(), per_attempt) {
                (Some(op), None) => format!("{op:.0} µs"),
                (Some(op), Some(sent)) => format!("{op:.0} µs ({sent:.0} µs per request sent)"),
                (None, Some(sent)) => format!("n/a ({sent:.0} µs per request sent)"),
                (None, None) => return None,
            };
            Some(format!("{}: {shown}", r.setting))
        })
        .collect();
    // "2: 18 µs": a numeric setting alone would read as part of the figure.
    by_setting_line(&format!("CPU per operation ({cpu_scope})"), &per_op, ", ");
    let peaks: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            let peak = r.peak.as_deref()?;
            let p99: Vec<String> = peak
                .ops
                .iter()
                .map(|(op, o)| format!("{} {}", op.as_str(), ms(o.latency_ms(0.99), 2)))
                .collect();
            let failed = match peak.attempts() - peak.total_ops() {
                0 => String::new(),
                n => format!("; {n} of its {} requests failed", peak.attempts()),
            };
            Some(format!(
                "{}: {:.0} ops/s (p99 {} ms{failed}), so {} requests/s",
                r.setting,
                peak.ops_per_sec(),
                p99.join(", "),
                r.rate_per_s?
            ))
        })
        .collect();
    by_setting_line(
        "Peak (a closed loop of the same setting and clients, just before) and the open loop's rate",
        &peaks,
        "; ",
    );
    let pickups: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            let h = r.pickup_us.as_ref().filter(|h| !h.is_empty())?;
            Some(format!("{}: {}", r.setting, percentiles_text(h)))
        })
        .collect();
    by_setting_line(
        "Wait from due to sent (part of each latency)",
        &pickups,
        "; ",
    );
    let queues: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            let h = r.client_queue_us.as_ref().filter(|h| !h.is_empty())?;
            Some(format!(
                "{}: {:.1}% of requests, {}",
                r.setting,
                100.0 * queued_share(h),
                percentiles_text(h)
            ))
        })
        .collect();
    by_setting_line(
        "Of that wait, queued with every client busy (on slow answers, or late to take them up), the rest being the load generator's lateness with a client free",
        &queues,
        "; ",
    );
    let machine: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            let m = r.machine?;
            Some(format!(
                "{}: {}",
                r.setting,
                machine_text(m, r.machine_cpu_us_per_op())
            ))
        })
        .collect();
    by_setting_line("This machine's CPU time (all processes)", &machine, "; ");
    if reports
        .iter()
        .any(|r| r.machine.is_some_and(|m| m.steal_pct >= STEAL_NOTE_PCT))
    {
        outln!("{STEAL_NOTE}");
    }
    if reports.iter().any(|r| r.machine.is_some_and(shows_polling)) {
        outln!("{POLL_NOTE}");
    }
    for r in reports {
        if let Some(reads) = r.client_reads {
            outln!("{}: {}", r.setting, client_reads_note(reads));
        }
        // Each client has one request out at a time (Little's law).
        let too_few_clients = r.rate_per_s.and_then(|rate| {
            let needed = r.clients_needed()?;
            (needed > 0.9 * clients as f64).then_some((rate, needed))
        });
        if let Some((per_s, needed)) = too_few_clients {
            let more = (needed * 1.5).ceil();
            let (asked, advice) = match rate {
                Some(Rate::ShareOfPeak { percent }) => (
                    format!("{per_s} requests/s ({percent}% of the peak)"),
                    // The peak run had the same clients: more of them
                    // raise the peak, and so the rate, too.
                    format!("raise --concurrency (to {more:.0} or more; the peak, and so the rate, may rise with it) or ask for a smaller share"),
                ),
                _ => (
                    format!("--rate {per_s}"),
                    format!("raise --concurrency to at least {more:.0}"),
                ),
            };
            outln!(
                "{}: each request took {:.2} ms once sent, so {asked} needs about {needed:.0} clients with one request out each, and --concurrency is {clients}: requests waited for a free client, and that wait (the bench's, not the store's) is in their latency; {advice}",
                r.setting,
                r.mean_service_ms.unwrap_or(0.0),
            );
        }
        if let Some(unsent) = r.unsent.filter(|u| *u > 0) {
            let why = match too_few_clients {
                Some(_) => "there were too few clients (above)",
                None => "the store fell far behind the rate",
            };
            outln!(
                "{}: {unsent} requests came due but were never sent (every client stayed busy until a request timeout past the end): {why}; they count as timeouts above, at what they had waited by then",
                r.setting
            );
        }
        for (op, o) in &r.ops {
            if let Some(reason) = &o.first_error {
                outln!(
                    "{} {}: {} errors; the first: {reason}",
                    r.setting,
                    op.as_str(),
                    o.errors
                );
            }
            if let Some(note) = failed_note(o) {
                outln!("{} {}: {note}", r.setting, op.as_str());
            }
        }
        if r.failovers > 0 {
            outln!("{}: {}", r.setting, failovers_note(r.failovers));
        }
        if r.reads_not_found > 0 {
            outln!(
                "{}: {} of {} reads found no value (records whose load or insert failed, or, with R+W<=N, replicas the write had not reached yet)",
                r.setting,
                r.reads_not_found,
                r.reads
            );
        }
    }
    if reports
        .iter()
        .any(|r| r.ops.iter().any(|(_, o)| o.timeouts > 0))
    {
        outln!("{TIMEOUTS_NOTE}");
    }
    if reports
        .iter()
        .any(|r| r.ops.iter().any(|(_, o)| o.shed > 0))
    {
        outln!("{SHED_NOTE}");
    }
    outln!();
    let header: Vec<String> = ycsb::STALENESS_T_MS
        .iter()
        .map(|t| format!("fresh@{t}ms"))
        .collect();
    outln!(
        "{:<16} {:>10} {:>9} {:>9} {}",
        "setting",
        "siblings",
        "mean/read",
        "max/read",
        header
            .iter()
            .map(|h| format!("{h:>12}"))
            .collect::<String>()
    );
    for r in reports {
        let (siblings, mean) = if r.reads == 0 {
            (0.0, 0.0)
        } else {
            (
                r.sibling_reads as f64 / r.reads as f64,
                r.values_read as f64 / r.reads as f64,
            )
        };
        let fresh: String = r
            .staleness
            .iter()
            .map(|v| {
                if v.probes == 0 {
                    format!("{:>12}", "-")
                } else {
                    format!("{:>11.1}%", v.fresh_share() * 100.0)
                }
            })
            .collect();
        outln!(
            "{:<16} {:>9.2}% {mean:>9.2} {:>9} {fresh}",
            r.setting.to_string(),
            siblings * 100.0,
            r.max_siblings
        );
        if let Some(intervals) = interval_row(&r.staleness) {
            outln!("{:<48}{intervals}", "  95% confidence interval");
        }
    }
    // A share over few probes says little (a short run makes only a few
    // per column): the counts behind them.
    let probed: Vec<String> = reports
        .iter()
        .filter(|r| !r.staleness.is_empty())
        .map(|r| {
            let counts: Vec<String> = r.staleness.iter().map(|v| v.probes.to_string()).collect();
            format!("{} {}", r.setting, counts.join("/"))
        })
        .collect();
    if !probed.is_empty() {
        // The same for every setting probed: the one --probers.
        let probers = reports.iter().map(|r| r.probers).max().unwrap_or(0);
        outln!(
            "Probes behind each fresh@ share ({probers} probers): {}",
            probed.join(", ")
        );
    }
    for r in reports {
        if let Some(why) = &r.staleness_skipped {
            outln!("{}: staleness not measured: {why}", r.setting);
        }
    }
}

/// The cells under a setting's fresh@ shares: each share's 95% confidence
/// interval, so that a difference between columns inside them is not read
/// as the store's (a short run makes tens to hundreds of probes per column). `None`
/// when nothing was probed.
fn interval_row(staleness: &[ycsb::Visibility]) -> Option<String> {
    let cells: Vec<String> = staleness
        .iter()
        .map(|v| match v.fresh_interval95() {
            Some((low, high)) => {
                format!("{:>12}", format!("{:.0}–{:.0}%", low * 100.0, high * 100.0))
            }
            None => format!("{:>12}", "-"),
        })
        .collect();
    staleness
        .iter()
        .any(|v| v.probes > 0)
        .then(|| cells.concat())
}

fn report_json(
    config: &YcsbConfig,
    args: &BenchArgs,
    embedded_nodes: usize,
    matrix: Option<&LatencyMatrix>,
    shape: &ClusterShape,
    reports: &[SettingReport],
    cpu_scope: &str,
) -> serde_json::Value {
    // The matrix itself, not only where it came from: a file may change
    // after the run, and a report must say what was measured.
    let link = |l: Link| json!({"delay_ms": l.delay_ms, "jitter_ms": l.jitter_ms, "loss": l.loss, "cut": l.cut});
    let latency_matrix = matrix.map(|m| {
        json!({
            "regions": m.regions(),
            "local": link(m.local()),
            "links": m.links().map(|(a, b, l)| {
                let mut entry = link(l);
                entry["between"] = json!([a, b]);
                entry
            }).collect::<Vec<_>>(),
        })
    });
    // The embedded nodes go round-robin over the regions (see `bench`).
    let node_regions = matrix.map(|m| {
        (0..embedded_nodes)
            .map(|i| embedded_region(m.regions(), i).to_string())
            .collect::<Vec<_>>()
    });
    json!({
        "config": {
            "workload": config.workload.to_string(),
            "records": config.records,
            "value_bytes": config.value_bytes,
            "updates": config.updates.as_str(),
            "request_distribution": config.distribution.unwrap_or_else(|| config.workload.distribution()).as_str(),
            "seed": config.seed,
            "request_timeout_ms": config.request_timeout_ms,
            "concurrency": config.concurrency,
            "connections_per_node": if config.resp { json!(null) } else { json!(config.connections_per_target) },
            "probers": if config.resp { json!(null) } else { json!(config.probers) },
            "client_reads": config.client_reads,
            "duration_s": config.duration.as_secs(),
            "warmup_s": config.warmup.as_secs(),
            // As given: a number a second, or a share of each setting's
            // peak ("50%"; each setting's rate_per_s is then its own).
            "rate": args.rate.map(|rate| rate.to_string()),
            "rate_per_s": config.rate_per_s,
            "loop": if args.rate.is_some() { "open" } else { "closed" },
            "replicas": shape.replicas,
            // What the probers' default follows (see `add_serving_regions`).
            "member_regions": if config.resp { json!(null) } else { json!(shape.regions) },
            "cluster": if args.cluster.is_empty() { json!(null) } else { json!(args.cluster) },
            // The nodes this process started (none against --cluster).
            "embedded_nodes": embedded_nodes,
            "target": args.target,
            "regions": if args.cluster.is_empty() && args.target.is_none() { json!(args.regions_source()) } else { json!(null) },
            "latency_matrix": latency_matrix,
            "node_regions": node_regions,
            // Each way between a client and its coordinator.
            "client_delay_ms": config.client_delay.as_secs_f64() * 1000.0,
            "cpu_scope": cpu_scope,
            // What the runtime has, not what was asked: the check that
            // --worker-threads took effect.
            "worker_threads": tokio::runtime::Handle::current().metrics().num_workers(),
            // Inherited from the shell that started the bench: what its
            // threads were scheduled with (see `sched_info`).
            "scheduler": crate::sched_info::SchedInfo::current_thread().to_json(),
        },
        "settings": reports.iter().map(setting_json).collect::<Vec<_>>(),
    })
}

/// One setting's results, as the JSON report gives them.
fn setting_json(r: &SettingReport) -> serde_json::Value {
    json!({
        "setting": r.setting.to_string(),
        "r": if r.setting.resp { json!(null) } else { json!(r.setting.r.to_string()) },
        "w": if r.setting.resp { json!(null) } else { json!(r.setting.w.to_string()) },
        "elapsed_s": r.elapsed.as_secs_f64(),
        "ops_per_sec": r.ops_per_sec(),
        "cpu_s": r.cpu.map(|d| d.as_secs_f64()),
        // The whole machine over the same stretch as cpu_s (see
        // machine_cpu).
        "machine_busy_pct": r.machine.map(|m| m.busy_pct),
        // Every process's CPU per success: with the cluster on this
        // machine, what an operation costs in all.
        "machine_cpu_us_per_op": r.machine_cpu_us_per_op(),
        "host_steal_pct": r.machine.map(|m| m.steal_pct),
        // Idle to machine_busy_pct, yet vCPU time (see machine_cpu).
        "machine_idle_poll_pct": r.machine.and_then(|m| m.idle_poll_pct),
        "cpu_us_per_op": r.cpu_us_per_op(),
        "cpu_us_per_attempt": r.cpu_us_per_attempt(),
        "unsent": r.unsent,
        "mean_service_ms": r.mean_service_ms,
        // Open loop: from due to a client taking it up, part of every
        // latency above.
        "pickup_ms": r.pickup_us.as_ref().map(percentiles_json),
        "client_queue_ms": r.client_queue_us.as_ref().map(percentiles_json),
        "client_queue_share": r.client_queue_us.as_ref().map(queued_share),
        "rate_per_s": r.rate_per_s,
        // With --rate PERCENT%: the closed loop run just before, whole.
        "peak": r.peak.as_deref().map(setting_json),
        "clients_needed": r.clients_needed(),
        "failovers": r.failovers,
        "ops": r.ops.iter().map(|(op, o)| {
            // As the table gives it, per operation type.
            let mut out = op_json(o);
            out["ops_per_sec"] = json!(r.op_ops_per_sec(o));
            // What the latency matrix predicts for p50, and the 45th and
            // 55th percentiles around it (see predict); null without a
            // prediction.
            let predicted = r.predicted_p50.iter().find(|p| p.op == *op);
            out["predicted_p50_ms"] = json!(predicted.map(|p| p.p50_ms));
            out["predicted_p45_ms"] = json!(predicted.map(|p| p.p45_ms));
            out["predicted_p55_ms"] = json!(predicted.map(|p| p.p55_ms));
            (op.as_str().to_string(), out)
        })
            .collect::<serde_json::Map<_, _>>(),
        "reads": r.reads,
        "reads_not_found": r.reads_not_found,
        "records_after": r.records_after,
        "sibling_reads": r.sibling_reads,
        "values_read": r.values_read,
        "max_siblings": r.max_siblings,
        "staleness": r.staleness.iter().map(|v| json!({
            "t_ms": v.t_ms, "probes": v.probes, "fresh": v.fresh, "failed": v.failed,
            "same_coordinator": v.same_coordinator,
            "fresh_share": if v.probes == 0 { json!(null) } else { json!(v.fresh_share()) },
            "fresh_ci95": v.fresh_interval95().map(|(low, high)| json!({ "low": low, "high": high })),
            "mean_gap_ms": v.mean_gap_ms(),
        })).collect::<Vec<_>>(),
        "probers": r.probers,
        "staleness_skipped": r.staleness_skipped,
        // With --client-reads: measured reads the replicas answered alike,
        // and those asked of a coordinator instead.
        "client_reads": r.client_reads.map(|c| json!({ "direct": c.direct, "fallbacks": c.fallbacks })),
    })
}

/// What the latency matrix's predictions start from for the embedded
/// cluster: the ring, and the regions its nodes were given (round-robin,
/// as `bench` gives them). `None`, and a warning, when no node's ring has
/// every node yet.
fn embedded_topology(
    nodes: &[NodeHandle],
    regions: &[String],
    matrix: &LatencyMatrix,
    client_delay: Duration,
) -> Option<Topology> {
    let ring = nodes
        .iter()
        .filter_map(|n| n.ring())
        .max_by_key(|r| r.len());
    let Some(ring) = ring.filter(|r| r.len() == nodes.len() && !regions.is_empty()) else {
        tracing::warn!("no node's ring has every embedded node yet: no predicted p50");
        return None;
    };
    let node_regions = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id().clone(), embedded_region(regions, i).to_string()))
        .collect();
    let client_leg_ms = client_delay.as_secs_f64() * 1000.0;
    match Topology::new((*ring).clone(), &node_regions, matrix, client_leg_ms) {
        Ok(topology) => Some(topology),
        Err(e) => {
            tracing::warn!(error = %e, "no predicted p50");
            None
        }
    }
}

/// The region of embedded node `i` (0-based): the nodes go round-robin
/// over the matrix's `regions` (never empty: a matrix has one at least).
fn embedded_region(regions: &[String], i: usize) -> &str {
    &regions[i % regions.len()]
}

/// How many nodes the embedded cluster starts: `--nodes`, else `default`.
fn embedded_nodes(args: &BenchArgs, default: usize) -> usize {
    args.nodes.map_or(default, usize::from)
}

/// The `--cluster` addresses, resolved. One node given twice (two
/// spellings of it, say) is refused: it would take twice the clients, and
/// staleness probes through "two" coordinators would measure nothing.
fn resolve_cluster(cluster: &[String]) -> Result<Vec<std::net::SocketAddr>, Failure> {
    let mut resolved: Vec<(std::net::SocketAddr, &String)> = Vec::new();
    for given in cluster {
        let addr = crate::args::check_node_addr("--cluster", given)
            .and_then(|()| resolve_addr("--cluster", given))
            .map_err(|e| Failure::new(Exit::Usage, e))?;
        if let Some((_, first)) = resolved.iter().find(|(a, _)| *a == addr) {
            let twice = match *first == given {
                true => format!("{given} is given twice"),
                false => format!("{given} and {first} are the same node ({addr})"),
            };
            return Err(Failure::new(
                Exit::Usage,
                format!("--cluster: {twice}; give each node once"),
            ));
        }
        resolved.push((addr, given));
    }
    Ok(resolved.into_iter().map(|(addr, _)| addr).collect())
}

/// Refuses, before anything runs, an output file that could not be written
/// at the end: its directory is missing or cannot be written in, or the
/// path is a directory.
fn check_output_path(flag: &str, path: Option<&Path>) -> Result<(), Failure> {
    let Some(path) = path else { return Ok(()) };
    let usage = |problem: String| {
        Err(Failure::new(
            Exit::Usage,
            format!("{flag} {}: {problem}", path.display()),
        ))
    };
    if path.as_os_str().is_empty() {
        return Err(Failure::new(
            Exit::Usage,
            format!("{flag}: the path is empty"),
        ));
    }
    if path.is_dir() {
        return usage("is a directory".into());
    }
    if path.as_os_str().to_string_lossy().ends_with('/') {
        return usage("ends in '/': give a file name".into());
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return usage(format!("directory {} does not exist", dir.display()));
    }
    // Tried now, not after a run of hours: the file written beside it.
    if let OutputTarget::Replace(target) = output_target(path) {
        let partial = partial_path(&target);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
        {
            Ok(_) => {
                let _ = std::fs::remove_file(&partial);
            }
            Err(e) => return usage(format!("cannot be written: {e}")),
        }
    }
    Ok(())
}

/// Whether two output paths would replace one file: the same directory
/// (after symbolic links) and name, once a link at the path itself is
/// followed (as writing it does, [`output_target`]). Devices and pipes,
/// written in place, may take both (`/dev/null`).
fn same_file(a: &Path, b: &Path) -> bool {
    let landing = |p: &Path| {
        let OutputTarget::Replace(p) = output_target(p) else {
            return None;
        };
        let dir = match p.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Some((
            std::fs::canonicalize(dir).ok()?,
            p.file_name()?.to_os_string(),
        ))
    };
    matches!((landing(a), landing(b)), (Some(a), Some(b)) if a == b)
}

/// Where a report goes.
#[derive(Debug, PartialEq)]
enum OutputTarget {
    /// A regular file, or a new one: written beside and renamed over (see
    /// [`write_whole`]). For a symbolic link, its target: the link stays.
    Replace(PathBuf),
    /// A device or a pipe (`/dev/stdout`, a shell's `>(jq .)`), or any
    /// path under `/dev` or `/proc`: written to directly. Renamed over, it
    /// would be replaced by a file (as root, for every process after).
    InPlace(PathBuf),
}

fn output_target(path: &Path) -> OutputTarget {
    // `/dev/stdout` with stdout sent to a file resolves to that file:
    // replaced, it would lose what the shell appends (`>>`) and what the
    // bench prints after.
    if path.starts_with("/dev") || path.starts_with("/proc") {
        return OutputTarget::InPlace(path.to_path_buf());
    }
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() && !meta.is_dir() => OutputTarget::InPlace(path.to_path_buf()),
        _ => OutputTarget::Replace(
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        ),
    }
}

/// The temporary file [`write_whole`] writes `target`'s bytes to first.
fn partial_path(target: &Path) -> PathBuf {
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    target.with_file_name(format!(".{name}.{}.partial", std::process::id()))
}

/// Writes a file whole or not at all: into a temporary file beside it, then
/// renamed over it, so a failure leaves no half-written report. A device
/// or pipe is written to directly (see [`OutputTarget`]).
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let target = match output_target(path) {
        OutputTarget::InPlace(path) => return std::fs::write(path, bytes),
        OutputTarget::Replace(target) => target,
    };
    let partial = partial_path(&target);
    let written = std::fs::write(&partial, bytes).and_then(|()| std::fs::rename(&partial, &target));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// The older benchmark: a put phase of new keys, then a get phase of them.
async fn putget(args: BenchArgs, cluster_key: Option<ClusterKey>) -> Result<Exit, Failure> {
    let setting = [Setting {
        r: args.r.unwrap_or(Consistency::Quorum),
        w: args.w.unwrap_or(Consistency::Quorum),
        resp: false,
    }];
    let embedded_dir = crate::server_cmd::scratch_dir("ringkv-bench");
    let (targets, embedded) = if args.cluster.is_empty() {
        check_settings(&setting, EMBEDDED_REPLICAS, "-r/-w")?;
        let _ = std::fs::remove_dir_all(&embedded_dir);
        let nodes = start_local_cluster_with(
            embedded_nodes(&args, PUTGET_NODES),
            EMBEDDED_REPLICAS,
            0,
            &embedded_dir,
            false,
            |_, config| {
                config.max_value_bytes = config.max_value_bytes.max(args.value_bytes);
                config.cluster_key = cluster_key.clone();
            },
        )
        .await?;
        (nodes.iter().map(|n| n.addr()).collect(), nodes)
    } else {
        let targets = resolve_cluster(&args.cluster)?;
        let replicas = cluster_shape(&targets, cluster_key.as_ref())
            .await?
            .replicas;
        check_settings(&setting, replicas, "-r/-w")?;
        (targets, Vec::new())
    };
    let config = LoadConfig {
        targets,
        concurrency: args.concurrency,
        phase_duration: Duration::from_secs(args.duration_s),
        value_bytes: args.value_bytes,
        r: args.r.unwrap_or(Consistency::Quorum),
        w: args.w.unwrap_or(Consistency::Quorum),
        request_timeout_ms: 2000,
        cluster_key,
    };
    if args.json.is_none() {
        errln!(
            "bench: {} clients, r={} w={}, {} B values, {} s per phase against {}",
            config.concurrency,
            config.r,
            config.w,
            config.value_bytes,
            args.duration_s,
            if embedded.is_empty() {
                "the given cluster".to_string()
            } else {
                format!("an embedded {}-node cluster", embedded.len())
            }
        );
    }
    let running = bar(100, "put".into());
    let result = ringkv_bench::run(&config, &|phase, share| {
        running.set_message(phase.to_string());
        running.set_position((share * 100.0) as u64);
    })
    .await;
    running.finish_and_clear();
    let embedded_count = embedded.len();
    for n in embedded {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&embedded_dir);
    let report = result.map_err(bench_failure)?;
    let out = json!({
        "put": phase_json(&report.put),
        "get": phase_json(&report.get),
        "failovers": report.failovers,
        "concurrency": config.concurrency,
        "r": config.r.to_string(),
        "w": config.w.to_string(),
        "value_bytes": config.value_bytes,
        "phase_duration_s": config.phase_duration.as_secs_f64(),
        "request_timeout_ms": config.request_timeout_ms,
        "cluster": config.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        "embedded_nodes": embedded_count,
    });
    // The file before the table (see `run_all`).
    let json_written = match args.json.as_deref() {
        Some(path) if path != "-" => write_whole(Path::new(path), format!("{out:#}\n").as_bytes())
            .map_err(|e| {
                Failure::new(Exit::Output, format!("--json {path}: cannot write it: {e}"))
            }),
        _ => Ok(()),
    };
    if args.json.as_deref() == Some("-") {
        outln!("{out}");
    } else {
        outln!("{:<4} {}", "op", op_columns_header());
        for (name, p) in [("put", &report.put), ("get", &report.get)] {
            outln!("{:<4} {}", name, op_columns(&p.counts, p.ops_per_sec(), 3));
        }
        for (name, p) in [("put", &report.put), ("get", &report.get)] {
            if let Some(reason) = &p.counts.first_error {
                outln!("{name}: {} errors; the first: {reason}", p.counts.errors);
            }
            if let Some(note) = failed_note(&p.counts) {
                outln!("{name}: {note}");
            }
        }
        if report.failovers > 0 {
            outln!("{}", failovers_note(report.failovers));
        }
        if report.put.counts.timeouts + report.get.counts.timeouts > 0 {
            outln!("{TIMEOUTS_NOTE}");
        }
        if report.put.counts.shed + report.get.counts.shed > 0 {
            outln!("{SHED_NOTE}");
        }
    }
    json_written?;
    Ok(Exit::Ok)
}

/// A latency for a table: `-` where none was recorded.
fn ms(latency_ms: Option<f64>, decimals: usize) -> String {
    latency_ms.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// Below this a prediction is not compared with the measured p50: the
/// model leaves out processing, tenths of a millisecond here, which is
/// then a large share of the whole.
const COMPARED_FROM_MS: f64 = 5.0;

/// The footer line of the latency matrix's predicted medians, each with
/// its 45th and 55th percentiles where they are different modes (a median
/// between two, see `OpPrediction::band`) and how far the measured one is
/// from the prediction.
fn predicted_line(reports: &[SettingReport]) {
    let predicted: Vec<String> = reports
        .iter()
        .filter(|r| !r.predicted_p50.is_empty())
        .map(|r| {
            let ops: Vec<String> = r
                .predicted_p50
                .iter()
                .map(|p| {
                    let measured = r
                        .ops
                        .iter()
                        .find(|(op, _)| *op == p.op)
                        .and_then(|(_, o)| o.latency_ms(0.5));
                    prediction_text(p, measured)
                })
                .collect();
            format!("{}: {}", r.setting, ops.join(", "))
        })
        .collect();
    by_setting_line(
        "p50 in ms that the latency matrix predicts (its delays alone, every node up)",
        &predicted,
        "; ",
    );
}

/// One operation's entry in [`predicted_line`]: its predicted p50, the
/// band where there is one, and how far `measured_ms` (the measured p50)
/// is from the prediction.
fn prediction_text(p: &OpPrediction, measured_ms: Option<f64>) -> String {
    // Below COMPARED_FROM_MS processing decides which sub-millisecond
    // mode a request lands in.
    let band = p.band().filter(|(_, high)| *high >= COMPARED_FROM_MS);
    let compared = band.is_some() || p.p50_ms >= COMPARED_FROM_MS;
    let band =
        band.map(|(low, high)| format!("p45–p55 {}–{}", ms(Some(low), 2), ms(Some(high), 2)));
    let off = measured_ms
        .filter(|_| compared)
        .map(|m| match (p.off_by(m), &band) {
            (0.0, Some(_)) => "measured within them".to_string(),
            (off, Some(_)) => format!("measured {:+.1}% from them", off * 100.0),
            (off, None) => format!("measured {:+.1}%", off * 100.0),
        });
    let notes: Vec<String> = band.into_iter().chain(off).collect();
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    };
    format!("{} {}{notes}", p.op.as_str(), ms(Some(p.p50_ms), 2))
}

/// One footer line naming a figure per setting; none when no setting has it.
fn by_setting_line(what: &str, per_setting: &[String], separator: &str) {
    if !per_setting.is_empty() {
        outln!("{what} by setting — {}", per_setting.join(separator));
    }
}

/// From this share of the machine's time taken by the host, the table's
/// footer says what that does to latencies.
const STEAL_NOTE_PCT: f64 = 0.5;

/// What a host taking CPU time means, for the table's footer.
const STEAL_NOTE: &str = "The host took CPU time from this virtual machine (steal): it stops the vCPUs, pausing nodes and clients alike, so the requests in flight take the pause on top of their latency whatever the store does.";

/// The share of the machine's time spent polling while idle from which the
/// machine line shows it, and the table's footer explains it: below it,
/// the odd poll of a kernel that halts at once.
const POLL_NOTE_PCT: f64 = 0.5;

/// What polling while idle means, for the table's footer.
const POLL_NOTE: &str = "Polling while idle: the kernel spun on idle CPUs before halting them (on a KVM guest, the haltpoll governor's guest_halt_poll_ns), so threads woken there ran at once; that time is idle to the busy figure, though on a virtual machine the host gave it to this one.";

/// Why latencies may reach the request timeout, for the table's footer.
const TIMEOUTS_NOTE: &str = "Latencies include timed-out requests, at the time the client gave up.";

/// What the "shed" column means, for the table's footer.
const SHED_NOTE: &str = "Shed requests were refused unrun by a node out of memory for requests (--max-request-memory-mb): the load passed what the nodes take in at once; they are not in the latency columns (their own are above, with the errors').";

/// Whether a setting polled enough while idle for the machine line to
/// show it and the footer to explain it.
fn shows_polling(m: ringkv_bench::machine_cpu::MachineShare) -> bool {
    m.idle_poll_pct.is_some_and(|p| p >= POLL_NOTE_PCT)
}

/// A setting's share of the machine, for the "This machine's CPU time"
/// line: busy (and per operation, when any succeeded), the host's steal,
/// and the polling while idle when there was enough to matter.
fn machine_text(m: ringkv_bench::machine_cpu::MachineShare, us_per_op: Option<f64>) -> String {
    let per_op = us_per_op.map_or(String::new(), |us| format!(" ({us:.0} µs per operation)"));
    let polling = m
        .idle_poll_pct
        .filter(|_| shows_polling(m))
        .map_or(String::new(), |p| format!(", {p:.1}% polling while idle"));
    format!(
        "{:.0}% busy{per_op}, {:.1}% taken by the host{polling}",
        m.busy_pct, m.steal_pct
    )
}

/// How a setting's client-driven reads went, for the table's footer.
fn client_reads_note(reads: ycsb::ClientReadCounts) -> String {
    format!(
        "client-driven reads: {} answered alike by the replicas asked, {} asked of a coordinator instead (replicas that disagreed, which it repairs, refused or failed)",
        reads.direct, reads.fallbacks
    )
}

/// What a count of failovers means, for the table's footer.
fn failovers_note(failovers: u64) -> String {
    format!(
        "connections moved to another node {failovers} times (a node stopped, drained or could not be reached; requests under way on it count as errors or timeouts)"
    )
}

fn phase_json(p: &PhaseReport) -> serde_json::Value {
    let mut out = op_json(&p.counts);
    out["ops_per_sec"] = json!(p.ops_per_sec());
    out["not_found"] = json!(p.not_found);
    out
}

/// How long the requests that failed or were shed took, for the table's
/// footer; `None` when none did.
fn failed_note(o: &OpReport) -> Option<String> {
    let h = o.failed_latency_us.as_ref().filter(|h| !h.is_empty())?;
    Some(format!(
        "the {} requests that failed or were shed took {} (not in the latency columns)",
        o.errors + o.shed,
        percentiles_text(h)
    ))
}

/// A footer's summary of a histogram of microseconds.
fn percentiles_text(h: &Histogram<u64>) -> String {
    let q = |q: f64| ms(ringkv_bench::quantile_ms(h, q), 2);
    format!("p50 {}, p99 {}, max {} ms", q(0.5), q(0.99), q(1.0))
}

/// The share of an open loop's requests that queued for a free client
/// (a wait above 0), 0 when none were measured.
fn queued_share(queue_us: &Histogram<u64>) -> f64 {
    match queue_us.len() {
        0 => 0.0,
        all => (all - queue_us.count_at(0)) as f64 / all as f64,
    }
}

/// The JSON's summary of a histogram of microseconds, in milliseconds.
fn percentiles_json(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50": ringkv_bench::quantile_ms(h, 0.5),
        "p99": ringkv_bench::quantile_ms(h, 0.99),
        "p999": ringkv_bench::quantile_ms(h, 0.999),
        "max": ringkv_bench::quantile_ms(h, 1.0),
    })
}

/// One operation type's counts and latency percentiles, as every report
/// gives them.
fn op_json(o: &OpReport) -> serde_json::Value {
    json!({
        "ops": o.ops,
        "errors": o.errors,
        "timeouts": o.timeouts,
        "shed": o.shed,
        "first_error": o.first_error,
        "p50_ms": o.latency_ms(0.5),
        "p95_ms": o.latency_ms(0.95),
        "p99_ms": o.latency_ms(0.99),
        "p999_ms": o.latency_ms(0.999),
        "max_ms": o.latency_ms(1.0),
        // Errors and shed requests, apart from the percentiles above.
        "failed_ms": o.failed_latency_us.as_ref().map(percentiles_json),
    })
}

/// The columns every table row gives after its labels, and their header.
fn op_columns_header() -> String {
    format!(
        "{:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>6}",
        "ops/s", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms", "errors", "timeouts", "shed"
    )
}

fn op_columns(o: &OpReport, ops_per_s: f64, decimals: usize) -> String {
    format!(
        "{:>9.0} {:>8} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>6}",
        ops_per_s,
        ms(o.latency_ms(0.5), decimals),
        ms(o.latency_ms(0.95), decimals),
        ms(o.latency_ms(0.99), decimals),
        ms(o.latency_ms(0.999), decimals),
        ms(o.latency_ms(1.0), decimals),
        o.errors,
        o.timeouts,
        o.shed
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_bench::machine_cpu::MachineShare;

    /// Polling shows on the machine line from half a percent, and never
    /// where the kernel has no polling state.
    #[test]
    fn the_machine_line_names_polling_that_matters() {
        let share = |idle_poll_pct| MachineShare {
            busy_pct: 82.4,
            steal_pct: 0.04,
            busy: std::time::Duration::from_secs(16),
            idle_poll_pct,
        };
        assert_eq!(
            machine_text(share(Some(16.84)), Some(69.2)),
            "82% busy (69 µs per operation), 0.0% taken by the host, 16.8% polling while idle"
        );
        let plain = "82% busy, 0.0% taken by the host";
        assert_eq!(machine_text(share(Some(0.3)), None), plain);
        assert_eq!(machine_text(share(None), None), plain);
        // The footer explains it under the same rule.
        assert!(shows_polling(share(Some(0.5))));
        assert!(!shows_polling(share(Some(0.49))));
        assert!(!shows_polling(share(None)));
    }

    /// A prediction's entry: compared where it is 5 ms or more, or has a
    /// band reaching that far; within a band, no figure for how far.
    #[test]
    fn a_prediction_reads_with_its_band_and_how_far_the_measured_p50_is() {
        use ringkv_bench::workload::Op;
        let p = |p45_ms, p50_ms, p55_ms| OpPrediction {
            op: Op::Read,
            p45_ms,
            p50_ms,
            p55_ms,
        };
        let one_mode = p(68.5, 68.5, 69.0);
        assert_eq!(
            prediction_text(&one_mode, Some(69.63)),
            "read 68.50 (measured +1.6%)"
        );
        assert_eq!(prediction_text(&one_mode, None), "read 68.50");
        let two_modes = p(74.5, 74.5, 122.5);
        assert_eq!(
            prediction_text(&two_modes, Some(78.72)),
            "read 74.50 (p45–p55 74.50–122.50; measured within them)"
        );
        assert_eq!(
            prediction_text(&two_modes, Some(134.75)),
            "read 74.50 (p45–p55 74.50–122.50; measured +10.0% from them)"
        );
        // Local: processing is all of it.
        assert_eq!(prediction_text(&p(0.5, 0.5, 1.0), Some(0.92)), "read 0.50");
        // A local median next to a remote mode: the band says so.
        assert_eq!(
            prediction_text(&p(0.5, 0.5, 70.0), Some(0.92)),
            "read 0.50 (p45–p55 0.50–70.00; measured within them)"
        );
    }

    /// Regions count once each however many members and answers name
    /// them, and only those of members that serve: a member down or
    /// leaving, or one given no region, adds none.
    #[test]
    fn the_probers_follow_the_distinct_regions_of_serving_members() {
        let member = |id: &str, region: Option<&str>, up: bool, leaving: Option<bool>| NodeStatus {
            id: ringkv_core::NodeId::new(id).unwrap(),
            addr: "127.0.0.1:7000".into(),
            up,
            region: region.map(String::from),
            vnodes: 64,
            hints_pending: None,
            last_exchange_unix_ms: None,
            keys_repaired: None,
            leaving,
            cleaning: None,
        };
        let view = || {
            vec![
                member("n1", Some("us-east"), true, Some(false)),
                member("n2", Some("us-east"), true, None),
                member("n3", Some("eu-west"), true, Some(false)),
                member("n4", Some("ap-south"), false, None),
                member("n5", Some("us-west"), true, Some(true)),
                member("n6", None, true, Some(false)),
            ]
        };
        let mut regions = BTreeSet::new();
        // Two targets' answers, listing the same members.
        add_serving_regions(&mut regions, view());
        add_serving_regions(&mut regions, view());
        assert_eq!(
            regions.into_iter().collect::<Vec<_>>(),
            ["eu-west", "us-east"]
        );
        let mut one = BTreeSet::new();
        add_serving_regions(&mut one, view().into_iter().take(2).collect());
        assert_eq!(one.len(), 1, "two members of one region: one region");
    }

    #[test]
    fn a_node_given_twice_in_cluster_is_refused() {
        let given = |list: &[&str]| {
            resolve_cluster(&list.iter().map(|a| a.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            given(&["127.0.0.1:7000", "127.0.0.1:7001"]).unwrap().len(),
            2
        );
        let refused = given(&["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7000"]).unwrap_err();
        assert_eq!(refused.exit, Exit::Usage);
        assert!(
            refused.message.contains("127.0.0.1:7000 is given twice"),
            "{}",
            refused.message
        );
        // Two spellings of one address: a host name and what it resolves to.
        let localhost = resolve_addr("--cluster", "localhost:7000")
            .unwrap()
            .to_string();
        let message = given(&[&localhost, "localhost:7000"]).unwrap_err().message;
        assert!(
            message.contains(&format!("localhost:7000 and {localhost} are the same node")),
            "{message}"
        );
    }

    /// --json and --plot that would replace one file are told apart from
    /// two files (and from a device, which takes both): by name, through
    /// another spelling of the directory, and through a link.
    #[test]
    fn json_and_plot_that_land_in_one_file_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("r.json"), dir.path().join("r.svg"));
        assert!(same_file(&a, &a));
        assert!(!same_file(&a, &b));
        let respelled = dir.path().join(".").join("r.json");
        assert!(same_file(&a, &respelled));
        let link = dir.path().join("latest");
        std::fs::write(&a, "").unwrap();
        std::os::unix::fs::symlink(&a, &link).unwrap();
        assert!(same_file(&link, &a));
        let null = Path::new("/dev/null");
        assert!(!same_file(null, null));
    }

    /// A report written through a symbolic link updates the link's target
    /// and leaves the link; a device is written to, never replaced; a
    /// directory that is not there is refused before the run.
    #[test]
    fn reports_go_through_links_and_to_devices_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let (target, link) = (
            dir.path().join("run42.json"),
            dir.path().join("latest.json"),
        );
        std::fs::write(&target, "old").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        check_output_path("--json", Some(&link)).unwrap();
        write_whole(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 2, "no partial file left: {left:?}");

        let stdout = Path::new("/dev/stdout");
        assert_eq!(
            output_target(stdout),
            OutputTarget::InPlace(stdout.to_path_buf())
        );
        let null = Path::new("/dev/null");
        assert_eq!(
            output_target(null),
            OutputTarget::InPlace(null.to_path_buf())
        );
        check_output_path("--json", Some(null)).unwrap();
        write_whole(null, b"x").unwrap();
        assert!(
            !std::fs::metadata(null).unwrap().is_file(),
            "still a device"
        );

        let missing = dir.path().join("no-such-dir/out.json");
        let refused = check_output_path("--json", Some(&missing)).unwrap_err();
        assert!(
            refused.message.contains("does not exist"),
            "{}",
            refused.message
        );
    }

    #[test]
    fn only_an_unreachable_node_exits_4() {
        let exit = |e| bench_failure(e).exit;
        let addr = "127.0.0.1:7000".parse().unwrap();
        let reason = String::from("refused");
        assert_eq!(
            exit(BenchError::Unreachable { addr, reason }),
            Exit::Unreachable
        );
        let first = String::from("quorum not reached");
        assert_eq!(
            exit(BenchError::LoadFailed { failed: 3, first }),
            Exit::Quorum
        );
        let reason = String::from("panicked");
        assert_eq!(exit(BenchError::ClientFailed { reason }), Exit::Internal);
        assert_eq!(exit(BenchError::NoConcurrency), Exit::Usage);
    }

    fn parsed(values: &[&str]) -> Result<Vec<String>, String> {
        let raw: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        parse_settings(&raw)
            .map(|settings| settings.iter().map(ToString::to_string).collect())
            .map_err(|f| f.message)
    }

    /// The issue's own syntax (`r=2,w=2`) is one setting, words and counts
    /// separated by commas are several, and every setting parses back from
    /// how the table prints it.
    #[test]
    fn consistency_settings_read_pairs_words_and_their_own_printing() {
        assert_eq!(parsed(&[]).unwrap(), ["one", "quorum", "all"]);
        assert_eq!(parsed(&["r=2,w=2"]).unwrap(), ["2"]);
        assert_eq!(parsed(&["r=1:w=2"]).unwrap(), ["r=1,w=2"]);
        assert_eq!(parsed(&["w=3,r=1"]).unwrap(), ["r=1,w=3"]);
        assert_eq!(
            parsed(&["one,r=1,w=all,quorum", "2"]).unwrap(),
            ["one", "r=1,w=all", "quorum", "2"]
        );
        for printed in ["r=1,w=all", "r=quorum,w=1", "one", "3"] {
            assert_eq!(parsed(&[printed]).unwrap(), [printed]);
        }
        for (bad, why) in [
            ("r=1", "a pair needs both halves"),
            ("r=1,r=2", "a pair needs both halves"),
            ("w=1,one", "a pair needs both halves"),
            ("one,,all", "empty setting"),
            ("r=1,w=most", "most"),
            ("", "empty setting"),
        ] {
            let err = parsed(&[bad]).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
