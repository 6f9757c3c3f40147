//! `node`, `cluster` and `demo`: commands that run nodes in this process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{GetRequest, PutRequest, Request, Response};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Client, Node, NodeConfig, NodeError, NodeHandle};
use serde_json::json;

use crate::args::{ClusterArgs, DemoArgs, NodeArgs};
use crate::{Exit, Failure};

pub async fn node(args: NodeArgs) -> Result<Exit, Failure> {
    let id = NodeId::new(args.id).map_err(|e| Failure::new(Exit::Usage, format!("--id: {e}")))?;
    let listen = resolve("--listen", &args.listen)?;
    if listen.port() == 0 {
        // A port the OS picks changes every start: peers would follow, but
        // clients and the operator's --seed lists would not.
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "--listen {} has port 0; give the port this node serves on at every start",
                args.listen
            ),
        ));
    }
    let cluster_key = crate::key_cmd::load(&args.key)?;
    let seeds = args
        .seeds
        .iter()
        .map(|s| resolve_peer("--seed", s))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(addr) = &args.metrics {
        install_metrics(addr)?;
    }
    let mut config = NodeConfig::new(id, listen, args.data_dir);
    config.seeds = seeds;
    config.replicas = args.replicas;
    config.vnodes = args.vnodes;
    config.region = args.region;
    if let Some(source) = &args.latency_matrix {
        config.latency_matrix = Some(std::sync::Arc::new(load_matrix(source)?));
    }
    config.sync = args.sync;
    config.new_epoch = args.new_epoch;
    config.cluster_key_replaced = args.cluster_key_replaced;
    config.max_value_bytes = args.limits.max_value_bytes;
    config.max_siblings = args.limits.max_siblings;
    config.max_connections = args.limits.max_connections;
    config.max_request_memory_mb = args.limits.max_request_memory_mb;
    config.low_background_priority = args.limits.background_priority == "low";
    config.join_timeout = Duration::from_secs(args.join_timeout_s);
    config.drain_timeout = Duration::from_secs(args.drain_timeout_s);
    config.membership_exchange_interval = Duration::from_secs(args.membership_exchange_interval_s);
    config.hints = !args.hints.no_hints;
    config.hint_ttl = Duration::from_secs(args.hints.hint_ttl_s);
    config.max_hints_per_target = args.hints.max_hints_per_target;
    config.max_hint_mb = args.hints.max_hint_mb;
    config.anti_entropy_interval = match args.anti_entropy.anti_entropy_interval_s {
        0 => None,
        s => Some(Duration::from_secs(s)),
    };
    config.tombstone_grace = Duration::from_secs(args.anti_entropy.tombstone_grace_s);
    config.repair_keys_per_s = args.anti_entropy.repair_keys_per_s;
    config.read_repair_chance = args.anti_entropy.read_repair_chance;
    config.cluster_key = cluster_key;
    // SIGHUP is listened for before the start, so one sent meanwhile (a
    // partition healed while this node restarts) is read once it serves,
    // not taken as the default end of the process.
    let hangup = match args.latency_matrix.is_some() {
        true => Signals::listen_hangup()?,
        false => None,
    };
    let handle = Node::start(config).await.map_err(node_failure)?;
    // After the start: Ctrl-C or SIGTERM during it ends the process
    // (nothing to drain).
    let mut signals = match Signals::new(hangup) {
        Ok(signals) => signals,
        Err(failure) => {
            handle.shutdown().await;
            return Err(failure);
        }
    };
    outln!("node {} serving on {}", handle.id(), handle.addr());
    let removed = loop {
        tokio::select! {
            caught = signals.caught() => match caught {
                Caught::Stop => break false,
                Caught::Hangup => {
                    if let Some(source) = &args.latency_matrix {
                        replace_matrix(&handle, source);
                    }
                }
            },
            () = handle.removed() => break true,
        }
    };
    if removed {
        errln!("shutting down");
    } else {
        errln!("shutting down (a second Ctrl-C stops at once)");
    }
    let id = handle.id().to_string();
    stop_or_exit_on_signal(handle.shutdown(), &mut signals).await;
    if removed {
        return Err(node_failure(NodeError::Removed { id }));
    }
    Ok(Exit::Ok)
}

/// `ringkv node`'s exit status when a second signal cuts its drain short:
/// 128 + SIGINT, as shells report an interrupted command.
const FORCED_STOP_EXIT: i32 = 130;

/// Runs `shutdown` (nodes draining), unless a signal comes first: then the
/// process exits at once.
async fn stop_or_exit_on_signal(
    shutdown: impl std::future::Future<Output = ()>,
    signals: &mut Signals,
) {
    tokio::select! {
        () = shutdown => {}
        () = signals.next() => {
            // Acknowledged writes are in the WAL already: this is a crash as
            // far as the store goes (see `Storage::begin_epoch`).
            errln!("stopped at once on a second signal: requests under way were cut off");
            std::process::exit(FORCED_STOP_EXIT);
        }
    }
}

/// SIGHUP: reads the `--latency-matrix` source again and puts it in effect
/// for the node's calls from now on (emulated partitions: a `cut` link),
/// naming the cut links. A matrix that does not load, or lacks a member's
/// region, is refused with the reason, and the old one stays in effect.
/// Counted in `ringkv_latency_matrix_reads_total{result}`.
fn replace_matrix(handle: &NodeHandle, source: &str) {
    let replaced = load_matrix(source).and_then(|matrix| {
        let cut: Vec<String> = matrix
            .links()
            .filter(|(_, _, link)| link.cut)
            .map(|(a, b, _)| format!("{a}-{b}"))
            .chain(matrix.local().cut.then(|| "within each region".to_string()))
            .collect();
        handle
            .replace_latency_matrix(matrix)
            .map(|()| cut)
            .map_err(|e| Failure::new(Exit::Usage, e.to_string()))
    });
    let result = match replaced {
        Ok(cut) => {
            let cut = match cut.is_empty() {
                true => "no link cut".to_string(),
                false => format!("cut: {}", cut.join(", ")),
            };
            errln!("SIGHUP: --latency-matrix {source} read again, in effect for calls from now on ({cut})");
            "in_effect"
        }
        Err(failure) => {
            errln!(
                "SIGHUP: kept the latency matrix in effect: {}",
                failure.message
            );
            "refused"
        }
    };
    metrics::counter!("ringkv_latency_matrix_reads_total", "result" => result).increment(1);
}

/// A latency matrix from `preset:NAME` or a TOML file.
pub fn load_matrix(source: &str) -> Result<ringkv_core::regions::LatencyMatrix, Failure> {
    use ringkv_core::regions::LatencyMatrix;
    let bad = |e: String| Failure::new(Exit::Usage, format!("--latency-matrix {source}: {e}"));
    if let Some(name) = source.strip_prefix("preset:") {
        return LatencyMatrix::preset(name).map_err(|e| bad(e.to_string()));
    }
    let text = std::fs::read_to_string(source).map_err(|e| bad(format!("cannot read it: {e}")))?;
    LatencyMatrix::parse_toml(&text).map_err(|e| bad(e.to_string()))
}

pub async fn cluster(args: ClusterArgs) -> Result<Exit, Failure> {
    check_cluster_args(&args)?;
    let cluster_key = crate::key_cmd::load(&args.key)?;
    if let Some(addr) = &args.metrics {
        install_metrics(addr)?;
    }
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ringkv-cluster-{}", args.base_port)));
    let nodes = start_local_cluster_with(
        args.nodes,
        args.replicas,
        args.base_port,
        &data_dir,
        args.sync,
        |_, config| config.cluster_key = cluster_key.clone(),
    )
    .await?;
    let mut signals = match Signals::new(None) {
        Ok(signals) => signals,
        Err(failure) => {
            for n in nodes {
                n.shutdown().await;
            }
            return Err(failure);
        }
    };
    outln!(
        "ringkv cluster: {} nodes, N={}, data in {}",
        nodes.len(),
        args.replicas,
        data_dir.display()
    );
    for n in &nodes {
        outln!("  {:<4} {}", n.id().as_str(), n.addr());
    }
    outln!(
        "{}",
        try_hint(
            nodes[0].addr(),
            args.key
                .files()
                .ok()
                .and_then(|(files, _)| files.into_iter().next())
                .as_deref()
        )
    );
    // A node removed from the cluster (`ringkv remove`) stops, as `ringkv
    // node` would; the others go on.
    let mut removals = tokio::task::JoinSet::new();
    for (i, n) in nodes.iter().enumerate() {
        let removed = n.removed();
        removals.spawn(async move {
            removed.await;
            i
        });
    }
    let mut nodes: Vec<Option<NodeHandle>> = nodes.into_iter().map(Some).collect();
    loop {
        tokio::select! {
            () = signals.next() => break,
            Some(Ok(i)) = removals.join_next() => {
                if let Some(node) = nodes[i].take() {
                    let id = node.id().to_string();
                    node.shutdown().await;
                    errln!("{id} was removed from the cluster and has stopped");
                }
            }
        }
    }
    removals.abort_all();
    errln!("shutting down (a second Ctrl-C stops at once)");
    // All at once: each drains for up to its drain timeout.
    let mut stopping = tokio::task::JoinSet::new();
    for n in nodes.into_iter().flatten() {
        stopping.spawn(n.shutdown());
    }
    stop_or_exit_on_signal(
        async { while stopping.join_next().await.is_some() {} },
        &mut signals,
    )
    .await;
    Ok(Exit::Ok)
}

/// Refuses, before anything starts, a cluster that could not serve.
fn check_cluster_args(args: &ClusterArgs) -> Result<(), Failure> {
    if args.nodes == 0 {
        return Err(Failure::new(Exit::Usage, "--nodes must be at least 1"));
    }
    if args.replicas == 0 {
        return Err(Failure::new(Exit::Usage, "--replicas must be at least 1"));
    }
    // Requests count members, so fewer nodes than N still serve while a
    // quorum of N are there; below that, every put and get at the default
    // (quorum) would fail.
    let quorum = args.replicas / 2 + 1;
    if args.nodes < quorum {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "--nodes {} is below a quorum of --replicas {} ({quorum}): every request at the default consistency would fail; lower --replicas or raise --nodes",
                args.nodes, args.replicas
            ),
        ));
    }
    if args.base_port == 0 {
        // As `node --listen` refuses port 0: the data dir, reused, keeps
        // each node's address, and its peers would look for it there.
        return Err(Failure::new(
            Exit::Usage,
            "--base-port 0 would give the nodes other ports on every run, while their data dirs keep their addresses; give a port",
        ));
    }
    if args.nodes < args.replicas {
        errln!(
            "note: {} nodes for N={}: reads and writes at `all` cannot succeed (each key has at most {} replicas here)",
            args.nodes,
            args.replicas,
            args.nodes
        );
    }
    if args.base_port as usize + args.nodes > usize::from(u16::MAX) + 1 {
        return Err(Failure::new(
            Exit::Usage,
            "--base-port + --nodes runs past port 65535",
        ));
    }
    Ok(())
}

/// The commands `cluster` suggests, given its first node's address and the
/// cluster key file: they name the node unless `--node`'s default reaches it.
fn try_hint(first: SocketAddr, key_file: Option<&std::path::Path>) -> String {
    let mut flags = String::new();
    if first.to_string() != crate::args::DEFAULT_NODE {
        flags.push_str(&format!(" --node {first}"));
    }
    if let Some(file) = key_file {
        flags.push_str(&format!(" --cluster-key-file {}", file.display()));
    }
    format!(
        "try: ringkv put hello world{flags} && ringkv get hello{flags}   (Ctrl-C stops the cluster)"
    )
}

/// Starts `count` nodes `n1..` on 127.0.0.1; port 0 picks free ports.
pub async fn start_local_cluster(
    count: usize,
    replicas: usize,
    base_port: u16,
    data_dir: &std::path::Path,
    sync: bool,
) -> Result<Vec<NodeHandle>, Failure> {
    start_local_cluster_with(count, replicas, base_port, data_dir, sync, |_, _| {}).await
}

/// Like [`start_local_cluster`], with `configure(i, config)` applied to
/// node `i`'s config (0-based) before it starts.
pub async fn start_local_cluster_with(
    count: usize,
    replicas: usize,
    base_port: u16,
    data_dir: &std::path::Path,
    sync: bool,
    configure: impl Fn(usize, &mut NodeConfig),
) -> Result<Vec<NodeHandle>, Failure> {
    let mut nodes: Vec<NodeHandle> = Vec::with_capacity(count);
    for i in 0..count {
        let id = NodeId::new(format!("n{}", i + 1)).expect("valid id");
        let port = if base_port == 0 {
            0
        } else {
            base_port + i as u16
        };
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        let mut config = NodeConfig::new(id.clone(), listen, data_dir.join(id.as_str()));
        config.replicas = Some(replicas);
        config.sync = sync;
        if let Some(first) = nodes.first() {
            config.seeds = vec![first.addr()];
        }
        configure(i, &mut config);
        match Node::start(config).await {
            Ok(handle) => nodes.push(handle),
            Err(e) => {
                for n in nodes {
                    n.shutdown().await;
                }
                // Every node here is given N: "restart without --replicas"
                // would not help. The cluster in the dir decides.
                if let NodeError::ReplicasMismatch { cluster, given } = e {
                    return Err(Failure::new(
                        Exit::Usage,
                        format!(
                            "the cluster kept in {} replicates every key {cluster} times, but --replicas {given} was given; use --replicas {cluster}, or another --data-dir for a new cluster",
                            data_dir.display()
                        ),
                    ));
                }
                // Nor would "a new --id": the cluster names its nodes.
                if let NodeError::Removed { id } = &e {
                    return Err(Failure::new(
                        Exit::Usage,
                        format!(
                            "{id} of the cluster kept in {} was removed from it (`ringkv remove`); use another --data-dir for a new cluster",
                            data_dir.display()
                        ),
                    ));
                }
                return Err(node_failure(e));
            }
        }
    }
    Ok(nodes)
}

/// A throwaway data dir for an embedded cluster: `<tmp>/<prefix>-<pid>`.
/// A run cut short (killed, or ended by SIGPIPE in `ringkv bench | head`)
/// cannot remove its dir, so the dirs of runs whose process is gone are
/// removed here first.
pub fn scratch_dir(prefix: &str) -> std::path::PathBuf {
    let tmp = std::env::temp_dir();
    // Liveness is read from /proc: elsewhere a running demo's dir would look
    // stale, so nothing is swept.
    let entries = if cfg!(target_os = "linux") {
        std::fs::read_dir(&tmp).ok()
    } else {
        None
    };
    if let Some(entries) = entries {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(prefix)?.strip_prefix('-'))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    tmp.join(format!("{prefix}-{}", std::process::id()))
}

/// The main demonstration until the bench replaces it: a throwaway 3-node
/// cluster, then reads and writes at each consistency level, siblings and a
/// delete, with what each cost.
pub async fn demo(args: DemoArgs) -> Result<Exit, Failure> {
    let dir = scratch_dir("ringkv-demo");
    let _ = std::fs::remove_dir_all(&dir);
    let nodes = start_local_cluster(3, 3, 0, &dir, false).await?;
    let result = run_demo(&nodes, args.json).await;
    for n in nodes {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

const DEMO_OPS: usize = 300;

async fn run_demo(nodes: &[NodeHandle], json_out: bool) -> Result<Exit, Failure> {
    let say = |line: String| {
        if !json_out {
            outln!("{line}");
        }
    };
    say(format!(
        "Started 3 nodes (N=3) on {}",
        nodes
            .iter()
            .map(|n| n.addr().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let clients = connect_all(nodes).await?;
    let mut levels = Vec::new();
    say(format!(
        "\n{DEMO_OPS} puts then {DEMO_OPS} gets per level, one client, 100-byte values:"
    ));
    say(format!(
        "{:<8} {:>12} {:>12} {:>12} {:>12}",
        "level", "put p50 ms", "put p99 ms", "get p50 ms", "get p99 ms"
    ));
    for level in [Consistency::One, Consistency::Quorum, Consistency::All] {
        let value = vec![b'x'; 100];
        let mut put_us = Vec::with_capacity(DEMO_OPS);
        let mut get_us = Vec::with_capacity(DEMO_OPS);
        for i in 0..DEMO_OPS {
            let key = format!("demo:{level}:{i}");
            let started = Instant::now();
            expect_ok(
                clients[i % 3]
                    .call(&put_request(
                        &key,
                        Payload::Value(value.clone()),
                        level,
                        None,
                    ))
                    .await,
            )?;
            put_us.push(started.elapsed().as_micros() as u64);
        }
        for i in 0..DEMO_OPS {
            let key = format!("demo:{level}:{i}");
            let started = Instant::now();
            expect_ok(clients[(i + 1) % 3].call(&get_request(&key, level)).await)?;
            get_us.push(started.elapsed().as_micros() as u64);
        }
        let (p50p, p99p, p50g, p99g) = (
            pct(&mut put_us, 50),
            pct(&mut put_us, 99),
            pct(&mut get_us, 50),
            pct(&mut get_us, 99),
        );
        say(format!(
            "{:<8} {:>12.3} {:>12.3} {:>12.3} {:>12.3}",
            level.to_string(),
            p50p,
            p99p,
            p50g,
            p99g
        ));
        levels.push(json!({"level": level.to_string(), "put_p50_ms": p50p, "put_p99_ms": p99p, "get_p50_ms": p50g, "get_p99_ms": p99g}));
    }

    say("\nTwo blind writes of one key through different nodes are concurrent:".to_string());
    let key = "demo:cart";
    expect_ok(
        clients[0]
            .call(&put_request(
                key,
                Payload::Value(b"milk".to_vec()),
                Consistency::All,
                None,
            ))
            .await,
    )?;
    expect_ok(
        clients[1]
            .call(&put_request(
                key,
                Payload::Value(b"eggs".to_vec()),
                Consistency::All,
                None,
            ))
            .await,
    )?;
    let (siblings, context) = read_values(&clients[2], key).await?;
    say(format!(
        "  get -> {} siblings: {}",
        siblings.len(),
        siblings.join(", ")
    ));
    expect_ok(
        clients[2]
            .call(&put_request(
                key,
                Payload::Value(b"milk,eggs".to_vec()),
                Consistency::Quorum,
                Some(context),
            ))
            .await,
    )?;
    let (resolved, context) = read_values(&clients[0], key).await?;
    say(format!(
        "  put with that get's context -> {}",
        resolved.join(", ")
    ));
    expect_ok(
        clients[0]
            .call(&put_request(
                key,
                Payload::Tombstone,
                Consistency::Quorum,
                Some(context),
            ))
            .await,
    )?;
    let (after_delete, _) = read_values(&clients[1], key).await?;
    say(format!(
        "  delete with context -> get finds {} values",
        after_delete.len()
    ));

    Client::close_all(clients).await;
    if json_out {
        outln!(
            "{}",
            json!({"levels": levels, "siblings": siblings, "resolved": resolved, "after_delete": after_delete})
        );
    }
    Ok(Exit::Ok)
}

async fn connect_all(nodes: &[NodeHandle]) -> Result<Vec<Client>, Failure> {
    let mut clients = Vec::new();
    for n in nodes {
        clients.push(
            Client::connect(n.addr(), Duration::from_secs(3))
                .await
                .map_err(|e| Failure::new(Exit::Unreachable, e.to_string()))?,
        );
    }
    Ok(clients)
}

fn put_request(key: &str, payload: Payload, w: Consistency, context: Option<String>) -> Request {
    Request::Put(PutRequest::new(key, payload, w, context))
}

fn get_request(key: &str, r: Consistency) -> Request {
    Request::Get(GetRequest::new(key, r))
}

async fn read_values(client: &Client, key: &str) -> Result<(Vec<String>, String), Failure> {
    match expect_ok(client.call(&get_request(key, Consistency::Quorum)).await)? {
        Response::Get(g) => {
            let mut values: Vec<String> = g
                .values
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            values.sort();
            Ok((values, g.context))
        }
        other => Err(Failure::new(
            Exit::Internal,
            format!(
                "unexpected answer {}",
                crate::output::debug_capped(&other, crate::output::ANSWER_SHOWN_CHARS)
            ),
        )),
    }
}

fn expect_ok(result: Result<Response, ringkv_node::CallError>) -> Result<Response, Failure> {
    match result {
        Ok(Response::Error(e)) => Err(Failure::new(Exit::Quorum, e.message)),
        Ok(r) => Ok(r),
        Err(e) => Err(Failure::new(Exit::Unreachable, e.to_string())),
    }
}

/// The `p`th percentile of `samples` (microseconds), in milliseconds.
fn pct(samples: &mut [u64], p: usize) -> f64 {
    samples.sort_unstable();
    let i = ((samples.len() * p).div_ceil(100))
        .saturating_sub(1)
        .min(samples.len() - 1);
    samples[i] as f64 / 1000.0
}

fn resolve(flag: &str, addr: &str) -> Result<SocketAddr, Failure> {
    crate::client_cmd::resolve_addr(flag, addr).map_err(|e| Failure::new(Exit::Usage, e))
}

/// As [`resolve`], for another node's address (a seed): port 0, which a
/// listener may take, reaches no node.
fn resolve_peer(flag: &str, addr: &str) -> Result<SocketAddr, Failure> {
    crate::args::check_node_addr(flag, addr).map_err(|e| Failure::new(Exit::Usage, e))?;
    resolve(flag, addr)
}

/// Buckets of every `*_seconds` histogram: 50 µs to a minute, finer
/// around the millisecond a quorum request takes on a LAN. A histogram
/// whose name matches no bucket rule would be exported as a summary again.
const SECONDS_BUCKETS: [f64; 22] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of `ringkv_wal_flush_writes`: writes per group commit.
const FLUSH_WRITES_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// How often the exporter folds recorded samples into its histograms.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves Prometheus metrics on `addr`.
///
/// Histograms are Prometheus histograms (fixed buckets), not the
/// exporter's default summaries: buckets add up across nodes
/// (`histogram_quantile` over a cluster), and folding samples into them is
/// cheap. The exporter folds them in a task on the node's own runtime:
/// into summaries, five seconds of a busy node's samples (the default
/// upkeep) took a single worker thread for 10–20 ms, every 5 s.
fn install_metrics(addr: &str) -> Result<(), Failure> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let addr = resolve("--metrics", addr)?;
    let cannot = |e: &dyn std::fmt::Display| {
        Failure::new(Exit::Usage, format!("cannot serve metrics on {addr}: {e}"))
    };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("ringkv_wal_flush_writes".into()),
                &FLUSH_WRITES_BUCKETS,
            )
        })
        .map_err(|e| cannot(&e))?
        .upkeep_timeout(METRICS_UPKEEP)
        .install()
        .map_err(|e| cannot(&e))?;
    ringkv_node::metrics_catalog::describe_all();
    Ok(())
}

fn node_failure(e: NodeError) -> Failure {
    let exit = match e {
        NodeError::Join { .. } => Exit::Unreachable,
        NodeError::StorageIo { .. } => Exit::Internal,
        _ => Exit::Usage,
    };
    Failure::new(exit, e.to_string())
}

/// Ctrl-C and SIGTERM, each listened for from creation on: a signal that
/// arrives between two waits is kept for the next, not lost (once a handler
/// is installed the default action, ending the process, no longer applies).
/// With `hangup`, SIGHUP too, which `ringkv node --latency-matrix` takes as
/// "read your matrix again", as daemons read their configuration again,
/// rather than the default end of the process (which other nodes and
/// `ringkv cluster` keep).
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hangup: Option<Hangup>,
}

/// A SIGHUP listener (none where there is no SIGHUP).
#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = std::convert::Infallible;

impl Signals {
    /// Listens for SIGHUP from now on (for [`new`](Self::new)); `None`
    /// where there is no SIGHUP.
    fn listen_hangup() -> Result<Option<Hangup>, Failure> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            signal(SignalKind::hangup())
                .map(Some)
                .map_err(|e| Failure::new(Exit::Internal, format!("cannot listen for SIGHUP: {e}")))
        }
        // No SIGHUP: the matrix is read at the start only.
        #[cfg(not(unix))]
        Ok(None)
    }

    fn new(hangup: Option<Hangup>) -> Result<Self, Failure> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind: SignalKind, name: &str| {
                signal(kind).map_err(|e| {
                    Failure::new(Exit::Internal, format!("cannot listen for {name}: {e}"))
                })
            };
            Ok(Signals {
                interrupt: listen(SignalKind::interrupt(), "SIGINT")?,
                terminate: listen(SignalKind::terminate(), "SIGTERM")?,
                hangup,
            })
        }
        #[cfg(not(unix))]
        {
            let _ = hangup;
            Ok(Signals {})
        }
    }

    /// Returns at the next Ctrl-C or SIGTERM (a SIGHUP meanwhile is
    /// passed over).
    async fn next(&mut self) {
        while self.caught().await != Caught::Stop {}
    }

    /// The next signal listened for.
    async fn caught(&mut self) -> Caught {
        #[cfg(unix)]
        {
            let hangup = async {
                if let Some(hangup) = &mut self.hangup {
                    // A stream that ended (it does not, while the runtime
                    // runs) would report a SIGHUP every time it is asked.
                    if hangup.recv().await.is_some() {
                        return;
                    }
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                _ = self.interrupt.recv() => Caught::Stop,
                _ = self.terminate.recv() => Caught::Stop,
                _ = hangup => Caught::Hangup,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Caught::Stop
        }
    }
}

/// What [`Signals::caught`] caught.
#[derive(Debug, PartialEq, Eq)]
enum Caught {
    /// Ctrl-C or SIGTERM.
    Stop,
    /// SIGHUP.
    Hangup,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    fn cluster_args(flags: &[&str]) -> ClusterArgs {
        let mut argv = vec!["ringkv", "cluster"];
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Cluster(a) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn a_cluster_needs_a_quorum_of_n_nodes() {
        let failure =
            check_cluster_args(&cluster_args(&["--nodes", "1", "--replicas", "3"])).unwrap_err();
        assert_eq!(failure.exit, Exit::Usage);
        assert!(
            failure
                .message
                .contains("--nodes 1 is below a quorum of --replicas 3 (2)"),
            "{}",
            failure.message
        );
        // Two of three replicas are a quorum: it serves.
        assert!(check_cluster_args(&cluster_args(&["--nodes", "2", "--replicas", "3"])).is_ok());
        assert!(check_cluster_args(&cluster_args(&[])).is_ok());
        assert!(check_cluster_args(&cluster_args(&["--nodes", "3", "--replicas", "3"])).is_ok());
        // No nodes at all is refused as the flags are read.
        assert!(Cli::try_parse_from(["ringkv", "cluster", "--nodes", "0"]).is_err());
        // Nor a port the system picks anew on every run.
        let failure = check_cluster_args(&cluster_args(&["--base-port", "0"])).unwrap_err();
        assert!(
            failure.message.contains("--base-port 0"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn the_try_hint_names_the_first_node_unless_it_is_the_default() {
        let default: SocketAddr = crate::args::DEFAULT_NODE.parse().unwrap();
        assert!(!try_hint(default, None).contains("--node"));
        let hint = try_hint("127.0.0.1:7100".parse().unwrap(), None);
        assert!(
            hint.contains("ringkv put hello world --node 127.0.0.1:7100 && ringkv get hello --node 127.0.0.1:7100 "),
            "{hint}"
        );
        let key = std::path::Path::new("cluster.key");
        let hint = try_hint("127.0.0.1:7100".parse().unwrap(), Some(key));
        assert!(
            hint.contains("ringkv get hello --node 127.0.0.1:7100 --cluster-key-file cluster.key"),
            "{hint}"
        );
    }
}
