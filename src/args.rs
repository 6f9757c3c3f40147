//! The command line, as clap sees it. Help texts are written to teach: each
//! says what the option does to the request and what the default means.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ringkv_bench::rate::Rate;
use ringkv_core::Consistency;
use ringkv_node::cluster_key::{key_files, CLUSTER_KEY_FILE_ENV};

#[derive(Parser, Debug)]
#[command(
    name = "ringkv",
    version,
    about = "A Dynamo-style leaderless key-value store",
    long_about = "A Dynamo-style leaderless key-value store.\n\n\
        Keys are placed on a consistent-hash ring and replicated to N nodes. Every request \
        chooses how many replicas must answer: reads wait for R, writes for W (a number, or \
        one, quorum, all). With R + W > N a read sees the latest acknowledged write.\n\n\
        Concurrent writes are never silently dropped: they come back as siblings with a causal \
        context, and a write carrying that context replaces them.\n\n\
        Quick start:\n  ringkv cluster                 # 3 nodes on 127.0.0.1:7000-7002, N=3\n  \
        ringkv put greeting hello      # in another terminal\n  ringkv get greeting -r all\n\n\
        Exit status: 0 ok, 1 key not found, 2 bad usage or input, 3 quorum not reached or \
        timed out, 4 node unreachable, 5 internal node error, 6 output not written, 130 \
        stopped by a second Ctrl-C (see the README for details)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing syntax, e.g. `info` or `ringkv_node=debug`); logs go to stderr.
    #[arg(long, global = true, env = "RINGKV_LOG", default_value = "warn")]
    pub log: String,
    /// How log lines are written: `text` for people, `json` for a log
    /// collector (one object per line: timestamp, level, target, fields).
    #[arg(
        long,
        global = true,
        env = "RINGKV_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// `--log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one node (a replica and coordinator) until Ctrl-C, SIGTERM, or its removal from the cluster.
    Node(NodeArgs),
    /// Run a local development cluster in this process until Ctrl-C.
    Cluster(ClusterArgs),
    /// Start a throwaway 3-node cluster and show reads and writes at each consistency level.
    Demo(DemoArgs),
    /// Write a value.
    Put(PutArgs),
    /// Read a key's value(s).
    Get(GetArgs),
    /// Delete a key (writes a tombstone).
    Delete(DeleteArgs),
    /// Show the cluster's members as one node sees them.
    Status(StatusArgs),
    /// Run one anti-entropy round on a node now: compare its Merkle trees with every peer's and repair the keys that differ.
    Repair(RepairArgs),
    /// Take a node out of the cluster for good (a dead machine, say): its key ranges pass to the next nodes on the ring.
    Remove(RemoveArgs),
    /// Take the node you ask (--node) out of the cluster gracefully: it hands every key it holds to the nodes that take over its ranges, then a member removes it.
    Leave(LeaveArgs),
    /// Drop the stray copies a node (--node) keeps of keys it no longer replicates, once a current replica holds them: run it on the old members after adding a node.
    Cleanup(CleanupArgs),
    /// Measure quorum latency, throughput and staleness per consistency setting (YCSB workloads, closed or open loop)
    ///
    /// With no flags: starts 5 nodes in this process across 3 emulated regions (preset:cloud3), loads 1,000 records, runs YCSB-A at one, quorum and all, and prints a table per setting: ops/s, latency percentiles, errors, siblings, and staleness (the share of reads issued t ms after a write was acknowledged through another node that see it).
    ///
    /// Examples:
    ///   ringkv bench                                              # the default comparison, under a minute
    ///   ringkv bench --consistency r=1:w=1 --consistency r=2:w=2 --json out.json --plot out.svg
    ///   ringkv bench --cluster 10.0.0.1:7000,10.0.0.2:7000 --workload c --concurrency 50
    ///   ringkv bench --cluster 127.0.0.1:7000 --rate 5000          # open loop: latency counts from when each request was due
    ///   ringkv bench --cluster 127.0.0.1:7000 --rate 50%           # the same at half the peak a closed loop measures first
    ///   ringkv bench --target resp://127.0.0.1:6379 --workload a    # the same workload against Redis, for a ratio
    #[command(verbatim_doc_comment)]
    Bench(BenchArgs),
    /// Make a new cluster key: give the same file to every node and client with --cluster-key-file.
    Keygen(KeygenArgs),
}

impl Command {
    /// Whether the command writes its result to stdout as JSON: then a
    /// failure goes there as JSON too (as well as to stderr), so a script
    /// reading stdout always gets an object.
    pub fn json_on_stdout(&self) -> bool {
        match self {
            Command::Put(a) => a.request.target.json,
            Command::Get(a) => a.request.target.json,
            Command::Delete(a) => a.request.target.json,
            Command::Status(a) => a.target.json,
            Command::Repair(a) => a.target.json,
            Command::Remove(a) => a.target.json,
            Command::Leave(a) => a.target.json,
            Command::Cleanup(a) => a.target.json,
            Command::Demo(a) => a.json,
            Command::Bench(a) => a.json.as_deref() == Some("-"),
            Command::Node(_) | Command::Cluster(_) | Command::Keygen(_) => false,
        }
    }
}

/// The cluster key, for every command that talks to nodes.
#[derive(Args, Debug, Clone, Default)]
pub struct KeyArgs {
    /// The cluster's key file (made by `ringkv keygen`). With a key, nodes and clients prove to each other that they hold it (mutual TLS) and refuse anyone who does not: give every node and every client the same file. Without one, anyone who can reach a node's port can use it. Given more than once, the first key is the one this process proves it holds and every one is accepted from others: to change keys without stopping the cluster, restart every process with `--cluster-key-file old --cluster-key-file new`, then with `new` before `old`, then with `new` alone. Without the flag, the files come from RINGKV_CLUSTER_KEY_FILE, comma-separated (a path with a comma in it takes the flag).
    #[arg(long, value_name = "FILE")]
    pub cluster_key_file: Vec<PathBuf>,
}

impl KeyArgs {
    /// The key files to read, and what named them (for errors): see
    /// [`key_files`].
    pub fn files(&self) -> Result<(Vec<PathBuf>, &'static str), String> {
        key_files(
            &self.cluster_key_file,
            std::env::var_os(CLUSTER_KEY_FILE_ENV),
        )
    }
}

#[derive(Args, Debug)]
#[command(
    after_help = "A key is 32 random bytes as 64 hex digits. Keep the file private (mode 600): whoever holds it can \
    read, write and remove nodes. To change a cluster's key without stopping it, see --cluster-key-file in `ringkv node --help`."
)]
pub struct KeygenArgs {
    /// Write the key to this file, readable by its owner only. An existing file is never overwritten. Without --out the key goes to stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// The most records a bench loads: a billion takes hours to load on any
/// cluster; far past it, the load would never end (and the "latest"
/// distribution sums a term per record before the run).
pub const RECORDS_MAX: u64 = 1_000_000_000;

#[derive(Args, Debug)]
#[command(
    after_help = "With no --cluster, the bench starts 5 nodes in this process (N=3), spread over 3 emulated regions \
    (the cloud3 preset: us-east, us-west, eu-west, with delays from public AWS inter-region medians), \
    loads --records keys, then runs the workload once per --consistency setting and prints them side by side.\n\n\
    Staleness (PBS t-visibility): probers write through one node and read through another t ms after the \
    acknowledgement (several pairs of nodes); 'fresh@t' is the share of those reads that saw the write, \
    and the row under it that share's 95% confidence interval (--probers and --duration-s set how many probes a run makes).\n\n\
    --workload putget is the older put-then-get phase benchmark (bench/loopback.sh uses it)."
)]
pub struct BenchArgs {
    /// Nodes of a running cluster, comma-separated. Default: start an embedded cluster in this process (5 nodes, N=3, see --nodes) across emulated regions.
    #[arg(long, value_name = "ADDR,...", value_delimiter = ',')]
    pub cluster: Vec<String>,
    /// Run the workload against a Redis-protocol store instead (resp://HOST:PORT, e.g. redis-server or Dynomite), for a side-by-side figure; GET and SET, no consistency settings.
    #[arg(long, value_name = "resp://HOST:PORT")]
    pub target: Option<String>,
    /// YCSB core workload: a (50% read, 50% update), b (95/5), c (read only), d (read latest, 5% insert), f (read-modify-write); or putget.
    #[arg(long, value_name = "NAME", default_value = "a")]
    pub workload: String,
    /// Records loaded before the run phase (YCSB workloads; putget writes its own keys), at most 1,000,000,000.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = bounded::<u64>(1, RECORDS_MAX))]
    pub records: u64,
    /// Consistency settings to run, each reported side by side (repeatable, comma-separated): one, quorum, all, a count (R = W), or a pair r=R,w=W (also r=R:w=W). E.g. --consistency one,quorum --consistency r=1,w=2. Default: one, quorum and all.
    #[arg(long, value_name = "SETTING")]
    pub consistency: Vec<String>,
    /// Concurrent clients, spread over the nodes.
    #[arg(long, value_name = "C", default_value_t = 16)]
    pub concurrency: usize,
    /// QUIC connections to each node that the clients share, like a client driver's pool (many clients' requests then share packets). Use --connections C to give every client its own (more than C are not opened). Not used with --target resp://, where each client has its own TCP connection, nor by putget.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = bounded::<u32>(1, u32::MAX.into()))]
    pub connections: u32,
    /// Open loop: requests come due at this many per second in total, on a fixed schedule; a free client sends the next one, and latency counts from when it was due, so waiting for a busy client counts too (no coordinated omission). At most 10000000. Or a share of the peak, 1% to 1000%, such as 50%: each setting first runs as a closed loop (same clients, warm-up and duration) to measure its peak ops/s, then as an open loop at that share of it, which is how "p99 at half the peak" is measured on any machine. Default: closed loop.
    #[arg(long, value_name = "OPS|PERCENT%", value_parser = rate_arg)]
    pub rate: Option<Rate>,
    /// Threads running the bench's clients (and, without --cluster, the embedded nodes). Default: one per core. With the cluster on the same machine, 1 leaves more of the cores to the nodes: in an open loop a second thread mostly wakes up to find nothing to do.
    #[arg(long, value_name = "N", value_parser = bounded::<u16>(1, 1024))]
    pub worker_threads: Option<u16>,
    /// How long each setting is measured, after its --warmup-s (twice with --rate PERCENT%: the peak, then the open loop; putget: each phase, with no warm-up).
    #[arg(long, value_name = "SECONDS", default_value_t = 6)]
    pub duration_s: u64,
    /// How long each setting's clients run before it is measured (YCSB workloads): connections, caches and the nodes' memtables warm up, and the first requests' costs stay out of the figures. 0 measures from the first request. Default: 1.
    #[arg(long, value_name = "SECONDS")]
    pub warmup_s: Option<u64>,
    /// Size of each written value.
    #[arg(long, value_name = "BYTES", default_value_t = 1024)]
    pub value_bytes: usize,
    /// How YCSB updates write: overwrite (replace what the coordinating replica holds, like SET; only writes coordinated concurrently by different nodes become siblings) or context (write with the context of the last version this client saw; concurrent updates of hot keys pile up siblings). YCSB workloads only.
    #[arg(long, value_name = "MODE", default_value = "overwrite", value_parser = ringkv_bench::ycsb::UpdateMode::parse)]
    pub updates: ringkv_bench::ycsb::UpdateMode,
    /// Which records reads and updates choose (YCSB's requestdistribution): zipfian (constant 0.99, scrambled over the records), latest (the newest records most often) or uniform. Default: the workload's own (latest for d, zipfian for the rest).
    #[arg(long, value_name = "zipfian|latest|uniform")]
    pub request_distribution: Option<String>,
    /// How many nodes the embedded cluster starts (N=3, so 3 to 64). Default: 5 for YCSB workloads, spread over the matrix's regions; 3 for putget. Not with --cluster or --target, which bring their own nodes.
    #[arg(long, value_name = "N", value_parser = bounded::<u16>(3, 64), conflicts_with_all = ["cluster", "target"])]
    pub nodes: Option<u16>,
    /// The embedded cluster's latency matrix: preset:NAME, a TOML file, or none; its nodes go round-robin over the matrix's regions, and under a closed loop's table a line gives the p50 the matrix predicts per operation (its delays alone) beside the measured one. Default: preset:cloud3. Only none with --cluster (those nodes emulate regions themselves: `ringkv node --latency-matrix`), --target or putget.
    #[arg(long, value_name = "preset:NAME|FILE|none")]
    pub regions: Option<String>,
    /// Read consistency for --workload putget (default quorum); YCSB workloads take --consistency instead.
    #[arg(short = 'r', long = "r", value_name = "R", value_parser = parse_consistency)]
    pub r: Option<Consistency>,
    /// Write consistency for --workload putget (default quorum).
    #[arg(short = 'w', long = "w", value_name = "W", value_parser = parse_consistency)]
    pub w: Option<Consistency>,
    /// Staleness probers, YCSB workloads only: each writes keys of its own through one node and reads each back through the next node t ms after the acknowledgement. More probers make more probes per t (narrower intervals) and a small load of their own that is not counted as operations: up to 70 requests a second each with no emulated delay, 8 to 24 with the default cross-region delays. 0 measures no staleness. Default: 16 when the nodes are in two or more regions (the embedded cluster's emulated ones, or the --region names of the --cluster members that are up), where each probe waits for cross-region round trips; 4 otherwise (and with region names on one machine with no --latency-matrix, give --probers 4: probes there are fast, and 16 would add up to 1,100 requests a second). At most 64.
    #[arg(long, value_name = "N", value_parser = bounded::<usize>(0, ringkv_bench::ycsb::PROBERS_MAX as u64), conflicts_with = "target")]
    pub probers: Option<usize>,
    /// Clients coordinate their own reads (Dynamo's client-driven coordination): they learn the members and the ring from a node (so --cluster may name just one) and ask each key's first R replicas at once, which saves the hop through a coordinator. A read whose replicas disagree, refuse or give no answer within half the request's time goes to a coordinator after all, which asks R replicas of its choosing and repairs those it finds stale. Writes still go through a coordinator. The table's footer counts the reads each way. YCSB workloads on ringkv nodes within one region: --regions none with the embedded cluster.
    #[arg(long, conflicts_with = "target")]
    pub client_reads: bool,
    /// Draw latency CDFs (one curve per setting and operation) and the staleness curve to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
    /// Write every number and the configuration as JSON to FILE (`-` or no FILE: stdout, instead of the table).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<String>,
    // With --cluster, the cluster's key; without, the bench's own nodes use it too.
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// This node's name on the ring and in version vectors; must stay the same across restarts.
    #[arg(long)]
    pub id: String,
    /// Address to serve QUIC on (UDP), which peers and clients use to reach this node.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// Where RocksDB keeps this node's data and its record of the cluster.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Threads serving requests. Default: one per core. When several nodes share a machine's cores (a test cluster), 1 each avoids threads of different nodes preempting one another.
    #[arg(long, value_name = "N", value_parser = bounded::<u16>(1, 1024))]
    pub worker_threads: Option<u16>,
    /// A running member to join through (repeatable). Not needed on restart: the node remembers its cluster. A seed list shared by every node may name this node too, if by the address given as its --listen: that one is skipped.
    #[arg(long = "seed", value_name = "HOST:PORT")]
    pub seeds: Vec<String>,
    /// Replicas per key (N) for a new cluster; default 3. Joining nodes adopt the cluster's N; giving a different one is an error.
    // No `default_value_t`: not giving it is what lets a joining or
    // restarting node adopt the N its cluster already has.
    #[arg(long, value_name = "N")]
    pub replicas: Option<usize>,
    /// The region this node is in (a name such as us-east), shown by `status --json` (and read by `ringkv bench --cluster`, which runs more staleness probers across regions).
    #[arg(long, value_name = "NAME")]
    pub region: Option<String>,
    /// Emulate network distance between regions: delay (with jitter and loss) every call to a peer by this matrix, a TOML file or `preset:cloud4` / `preset:cloud3` (AWS inter-region medians). Needs --region; every node of a cluster should get the same matrix. The node reads the file again on SIGHUP (a file that does not load, or lacks a member's region, is refused and the old matrix kept): a link with `cut = true` emulates a network partition, so send SIGHUP to every node after editing the file to make or heal one.
    #[arg(long, value_name = "FILE|preset:NAME", requires = "region")]
    pub latency_matrix: Option<String>,
    /// Virtual nodes on the ring; more spread load more evenly, and a node's share of the keys follows its count. Changing it on a restart moves keys between the members, as a join does (the ring hand-over sends them).
    #[arg(long, value_name = "V", default_value_t = ringkv_ring::DEFAULT_VNODES, value_parser = bounded::<u32>(1, u64::from(ringkv_ring::VNODES_MAX)))]
    pub vnodes: u32,
    /// Fsync the write-ahead log before acknowledging each write (group commit). Without it, writes survive a process crash but not power loss.
    #[arg(long)]
    pub sync: bool,
    /// Mint new writes under a new epoch of this node's version-vector actor, whatever the last run was. Needed once when the data dir was restored from a copy, backup or snapshot: its store may be older than what the node last wrote, and reusing the epoch could give a new write the version of one the other replicas already hold (it would be lost).
    #[arg(long)]
    pub new_epoch: bool,
    /// Start although the data dir last ran with another cluster key, or with one and now none (a node refuses that by default: its data dir remembers the keys it ran with). For a cluster whose key was lost: stop every node and start each once with the new key (or none) and this flag.
    #[arg(long)]
    pub cluster_key_replaced: bool,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// How long to keep trying the seeds before giving up (at once if every seed refuses this node at the handshake: another cluster key).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub join_timeout_s: u64,
    /// At shutdown (Ctrl-C or SIGTERM), how long requests already under way may finish while new ones are refused ("shutting down; ask another node"). A second signal stops the node at once. 0 stops them at once.
    #[arg(long, value_name = "SECONDS", default_value_t = ringkv_node::server::DEFAULT_DRAIN_TIMEOUT.as_secs())]
    pub drain_timeout_s: u64,
    /// How often this node asks one member (at random, among those up) for the cluster's member list, so that changes it was not told of directly reach it: a member that joined through another node, or its own removal while it was cut off. One small request each time.
    #[arg(long, value_name = "SECONDS", default_value_t = ringkv_node::server::DEFAULT_MEMBERSHIP_EXCHANGE_INTERVAL.as_secs(), value_parser = bounded::<u64>(1, 3600))]
    pub membership_exchange_interval_s: u64,
    #[command(flatten)]
    pub hints: HintArgs,
    #[command(flatten)]
    pub anti_entropy: AntiEntropyArgs,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// Read repair, anti-entropy and tombstone collection.
#[derive(Args, Debug, Clone)]
pub struct AntiEntropyArgs {
    /// Share of quorum reads (0 to 1) that ask every replica instead of only R of them (this node and the fastest peers), so that read repair judges every replica. 1 asks all N always, as Dynamo does; lower is cheaper.
    #[arg(long, value_name = "SHARE", default_value_t = ringkv_coordinator::coordinator::DEFAULT_READ_REPAIR_CHANCE, value_parser = parse_share)]
    pub read_repair_chance: f64,
    /// Seconds between anti-entropy rounds, in which this node compares Merkle trees with every peer and repairs what differs; 0 runs them only on demand (`ringkv repair`).
    #[arg(long, value_name = "SECONDS", default_value_t = ringkv_repair::anti_entropy::DEFAULT_ANTI_ENTROPY_INTERVAL_S)]
    pub anti_entropy_interval_s: u64,
    /// Most keys anti-entropy repairs per second, so that a large repair does not crowd out client requests; also the pace at which this node hands the keys of ranges it gave up (a node joined) to their new replicas.
    #[arg(long, value_name = "KEYS", default_value_t = ringkv_repair::anti_entropy::DEFAULT_REPAIR_KEYS_PER_S, value_parser = bounded::<u32>(1, u32::MAX.into()))]
    pub repair_keys_per_s: u32,
    /// Keep a delete's tombstone at least this long, and until every replica of the key holds it; then it is collected. Keep it longer than --hint-ttl-s, or an old hint could bring a deleted value back. The default is 1 day.
    #[arg(long, value_name = "SECONDS", default_value_t = ringkv_repair::tombstones::DEFAULT_TOMBSTONE_GRACE_S, value_parser = bounded::<u64>(1, u64::MAX))]
    pub tombstone_grace_s: u64,
}

/// Hinted handoff (the sloppy quorum's memory).
#[derive(Args, Debug, Clone)]
pub struct HintArgs {
    /// Store no hints for other nodes, and do not send writes to fallbacks when a replica is down: writes then need W of the key's own replicas. Hints already held are still delivered.
    #[arg(long)]
    pub no_hints: bool,
    /// The hint window: a hint whose newest write is older than this is dropped (and counted); anti-entropy repairs what it would have, except a stand-in's write, which only hints hold. The default is 3 hours.
    #[arg(long, value_name = "SECONDS", default_value_t = ringkv_repair::hints::DEFAULT_HINT_TTL_S, value_parser = bounded::<u64>(1, u64::MAX))]
    pub hint_ttl_s: u64,
    /// Most hints held for any one node; past it, writes for that node go to the next fallback.
    #[arg(long, value_name = "COUNT", default_value_t = ringkv_repair::hints::DEFAULT_MAX_HINTS_PER_TARGET, value_parser = bounded::<u64>(1, u64::MAX))]
    pub max_hints_per_target: u64,
    /// Most MiB of hints this node holds for all others together (values and their bookkeeping); past it, writes that would need a hint here go to the next fallback. Bounds the disk hints take while nodes are down for long under large values.
    #[arg(long, value_name = "MIB", default_value_t = ringkv_repair::hints::DEFAULT_MAX_HINT_MB, value_parser = bounded::<u64>(1, ringkv_node::server::MAX_HINT_MB_LIMIT))]
    pub max_hint_mb: u64,
}

#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// Largest value accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = ringkv_coordinator::coordinator::DEFAULT_MAX_VALUE_BYTES)]
    pub max_value_bytes: usize,
    /// Most concurrent values (siblings) a key may hold; further blind writes are refused until a write with a context resolves them.
    #[arg(long, value_name = "COUNT", default_value_t = ringkv_coordinator::replica::DEFAULT_MAX_SIBLINGS, value_parser = bounded::<usize>(1, ringkv_core::dvv::SIBLINGS_CONFIG_MAX as u64))]
    pub max_siblings: usize,
    /// Most connections (clients and peers) served at once, handshakes included; further ones are refused. Leave room for the other nodes. A handshake may take 5 s; past half the slots a new client first proves its address (one more round trip). One address that no member has may hold a sixteenth of them (at least 64).
    #[arg(long, value_name = "COUNT", default_value_t = ringkv_node::server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Most MiB of request bodies held in memory at once, across all connections (each connection may hold up to 130 MiB of it). Requests past it are not run: they are answered "overloaded", and clients retry later or elsewhere. At least 87, so the largest value fits in the three quarters large requests may take.
    #[arg(long, value_name = "MIB", default_value_t = ringkv_node::server::DEFAULT_MAX_REQUEST_MEMORY_MB)]
    pub max_request_memory_mb: usize,
    /// CPU priority of RocksDB's flushes and compactions: low (nice 19, so they use idle time and leave the cores to requests) or normal (use normal if the node is CPU-bound for long and RocksDB starts stalling writes).
    #[arg(long, value_name = "low|normal", default_value = "low", value_parser = ["low", "normal"])]
    pub background_priority: String,
}

#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// How many nodes to run (at most 1024, each on its own port from --base-port).
    #[arg(long, value_name = "K", default_value_t = 3, value_parser = bounded::<usize>(1, 1024))]
    pub nodes: usize,
    /// Where the nodes keep their data (one subdirectory each). Default: a directory under the system temp dir, reused across runs.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node i listens on 127.0.0.1:BASE_PORT+i-1.
    #[arg(long, value_name = "PORT", default_value_t = 7000)]
    pub base_port: u16,
    /// Replicas per key (N).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub replicas: usize,
    /// Fsync before acknowledging writes.
    #[arg(long)]
    pub sync: bool,
    /// Serve Prometheus metrics (of all nodes together) on this address.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    // Every node of this cluster uses the key.
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The node to send the request to; any node will do, it forwards to the key's replicas. Several, comma-separated, are tried in turn while one cannot be reached or serves nothing now (shutting down, removed, still joining): nothing ran there, so nothing is sent twice.
    #[arg(
        long,
        value_name = "HOST:PORT[,…]",
        env = "RINGKV_NODE",
        default_value = DEFAULT_NODE
    )]
    pub node: String,
    /// Print the result as JSON (for scripts).
    #[arg(long)]
    pub json: bool,
    /// Give up on reaching the node after this long: 1 to 10000 ms, since the QUIC idle timeout (10 s) ends any handshake that takes longer. (A node gives a handshake 5 s from the first packet it hears; the rest covers packets lost on the way.)
    #[arg(long, value_name = "MS", default_value_t = 3000, value_parser = bounded::<u64>(1, ringkv_node::tls::IDLE_TIMEOUT_MS))]
    pub connect_timeout_ms: u64,
    #[command(flatten)]
    pub key: KeyArgs,
}

impl BenchArgs {
    /// The embedded cluster's latency matrix: `--regions`, else the
    /// default preset.
    pub fn regions_source(&self) -> &str {
        self.regions.as_deref().unwrap_or("preset:cloud3")
    }
}

/// The node a request goes to without `--node`: the first of `ringkv cluster`'s.
pub const DEFAULT_NODE: &str = "127.0.0.1:7000";

/// The highest `--rate`: far beyond what one bench process sends (its
/// pacer thread hands out one request at a time), and low enough that a
/// day's schedule is counted without overflow.
pub const RATE_MAX: u64 = 10_000_000;

impl Target {
    /// The addresses `--node` lists, in order; an error names the first
    /// that is not `HOST:PORT`. Names are looked up only when their turn
    /// comes, so one that no longer resolves does not stop the others.
    pub fn nodes(&self) -> Result<Vec<String>, String> {
        let flag = self.node_source();
        let nodes: Vec<&str> = self.node.split(',').map(str::trim).collect();
        if nodes.iter().any(|n| n.is_empty()) {
            return Err(format!(
                "{flag} {:?} has an empty entry; list HOST:PORT addresses separated by commas",
                self.node
            ));
        }
        for node in &nodes {
            check_node_addr(flag, node)?;
        }
        Ok(nodes.into_iter().map(String::from).collect())
    }
}

impl Target {
    /// Where the node list came from, for errors about it: `RINGKV_NODE`
    /// when that holds it (no `--node` given, or the same value), else
    /// `--node`.
    pub fn node_source(&self) -> &'static str {
        if std::env::var("RINGKV_NODE").is_ok_and(|env| env == self.node) {
            "RINGKV_NODE"
        } else {
            "--node"
        }
    }
}

/// Whether `addr` has the form `HOST:PORT` (the host not yet resolved).
pub fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// Checks that `addr`, `flag`'s value, has the form `HOST:PORT`; the error
/// says what is wrong with it.
pub fn check_host_port(flag: &str, addr: &str) -> Result<(), String> {
    // `http://host:7000` splits into a "host" and a port, and would fail
    // only at lookup, as a name that cannot be resolved: point at the scheme.
    if addr.contains("://") {
        return Err(format!(
            "{flag} {addr:?} has a scheme; give HOST:PORT without one, e.g. 127.0.0.1:7000"
        ));
    }
    if !is_host_port(addr) {
        return Err(not_an_address(flag, addr));
    }
    Ok(())
}

/// Checks that `addr`, `flag`'s value, is another node's `HOST:PORT`. Port 0
/// only means "any free port" to a listener: no node can be reached on it.
pub fn check_node_addr(flag: &str, addr: &str) -> Result<(), String> {
    check_host_port(flag, addr)?;
    if addr
        .rsplit_once(':')
        .is_some_and(|(_, port)| matches!(port.parse::<u16>(), Ok(0)))
    {
        return Err(format!(
            "{flag} {addr:?} has port 0, on which no node can be reached; give the port the node serves on"
        ));
    }
    Ok(())
}

/// The error for a `flag` value that is not `HOST:PORT`.
pub fn not_an_address(flag: &str, addr: &str) -> String {
    format!("{flag} {addr:?} is not an address; use HOST:PORT, e.g. 127.0.0.1:7000")
}

/// Options every key request takes.
#[derive(Args, Debug, Clone)]
pub struct RequestOpts {
    /// Deadline for the whole request, replicas included.
    #[arg(long, value_name = "MS", default_value_t = ringkv_coordinator::coordinator::DEFAULT_REQUEST_TIMEOUT_MS, value_parser = bounded::<u32>(1, 60_000))]
    pub timeout_ms: u32,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
pub struct PutArgs {
    /// The key: any text up to 1024 bytes.
    pub key: String,
    /// The value; `-` or absent reads it from stdin (binary-safe).
    pub value: Option<String>,
    /// Replicas that must acknowledge: a count from 1 to N, one, quorum or all.
    #[arg(short = 'w', long = "w", value_name = "W", default_value = "quorum", value_parser = parse_consistency)]
    pub w: Consistency,
    /// The context token from a previous get: the write replaces the values that read saw. Without it the write is blind and may add a sibling.
    #[arg(long, value_name = "TOKEN", conflicts_with = "overwrite")]
    pub context: Option<String>,
    /// Replace every value the coordinating replica holds, without reading first (last writer wins there). Values only other replicas hold still come back as siblings.
    #[arg(long)]
    pub overwrite: bool,
    /// Count only the key's own preference-list nodes toward W (Riak's PW): no fallback stands in for a node that is down, so the request fails rather than use a sloppy quorum.
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub request: RequestOpts,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// The key: any text up to 1024 bytes.
    pub key: String,
    /// Replicas that must answer: a count from 1 to N, one, quorum or all.
    #[arg(short = 'r', long = "r", value_name = "R", default_value = "quorum", value_parser = parse_consistency)]
    pub r: Consistency,
    /// Count only the key's own preference-list nodes toward R (Riak's PR): no fallback stands in for a node that is down, so the request fails rather than use a sloppy quorum.
    #[arg(long)]
    pub strict: bool,
    /// Read only the contacted node's own copy, without a quorum (for operators and tests). Asks no other replica, so -r, --strict and --wait-repair do not apply.
    #[arg(long, conflicts_with_all = ["r", "strict", "wait_repair"])]
    pub local: bool,
    /// Answer only after replicas this read found stale have been repaired. Read repair otherwise runs in the background after the answer.
    #[arg(long)]
    pub wait_repair: bool,
    #[command(flatten)]
    pub request: RequestOpts,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// The key: any text up to 1024 bytes.
    pub key: String,
    /// Replicas that must acknowledge the tombstone: a count from 1 to N, one, quorum or all.
    #[arg(short = 'w', long = "w", value_name = "W", default_value = "quorum", value_parser = parse_consistency)]
    pub w: Consistency,
    /// The context token from a previous get. Without it, ringkv first reads the key (R=quorum) and deletes what that read saw; the read and the delete each get --timeout-ms.
    #[arg(long, value_name = "TOKEN")]
    pub context: Option<String>,
    /// Count only the key's own preference-list nodes toward W (Riak's PW): no fallback stands in for a node that is down, so the request fails rather than use a sloppy quorum.
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub request: RequestOpts,
}

#[derive(Args, Debug)]
#[command(mut_arg("node", |a| a.help(STATUS_NODE_HELP)))]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
#[command(
    mut_arg("node", |a| a.help(REPAIR_NODE_HELP)),
    after_help = "The round runs on the node given by --node, against every other member; \
    each side gets the merge of both versions (concurrent siblings are kept). \
    Exits 0 when every peer was compared, 4 when some could not be (they are listed)."
)]
pub struct RepairArgs {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
#[command(
    mut_arg("node", |a| a.help(REMOVE_NODE_HELP)),
    after_help = "Any member can do it (not the node being removed): it drops the node from its member list, \
    tells every other member at once, and answers with the members left and any it could not tell. Those learn \
    of the removal through the membership exchange (every --membership-exchange-interval-s, 5 s by default). Hints held for the node go to the replicas \
    of their keys under the ring without it.\n\n\
    The node's key ranges pass to the next nodes on the ring; run `ringkv repair` on each member (or wait \
    for the periodic anti-entropy rounds) to copy the keys onto them. A write that only the removed node \
    held (W=1 while the others were down) is lost with it.\n\n\
    A removed node still running stops once a member refuses its requests as from a removed node, or at its next membership exchange; started again it refuses to run. \
    To bring the machine back, start it with a new --id and an empty --data-dir. Removal cannot be undone.\n\n\
    Exits 0 once removed (or if it already was), 2 if refused (an unknown id, the node asked being the one \
    to remove, or too few members left for N: add the replacement first), 3 if the node asked is not in a \
    cluster yet, 4 if it cannot be reached."
)]
pub struct RemoveArgs {
    /// The id of the node to remove (as `ringkv status` lists it).
    #[arg(value_name = "ID")]
    pub id: String,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
#[command(
    mut_arg("node", |a| a.help(LEAVE_NODE_HELP)),
    after_help = "Sent to the node that leaves (--node). It hands every key it replicates, tombstones included, \
    to the key's replicas under the ring without it, and only then asks another member to remove it (unlike \
    `ringkv remove`, which is for a machine that is gone and loses what only it held). Then it stops serving, \
    waits for the requests under way, and hands over once more the writes that arrived meanwhile. It keeps \
    running until you stop it; unless the answer names a member that missed that last hand-over, its data dir \
    can then be deleted. Started again, it refuses, like a removed node. Hints other members hold for it go to \
    the replicas of their keys, as with `ringkv remove`. On a terminal a spinner counts the keys sent.\n\n\
    Exits 0 once it has left, 2 if refused (the cluster would keep fewer than N members: add a node first; it \
    holds hints for members that are down; it is already leaving; or another member is, or is running a cleanup, or \
    has left and this node has not learned it yet: nodes leave one at a time, so run it again once that leave has returned), 3 if a member could not be asked whether it is leaving, or a replica could not take its keys \
    (it is then still a member and nothing was removed: bring that member up, or remove it, and leave again) \
    or no member confirmed the removal and none turned out to have removed it (it looks for 10 s, 30 s while a \
    request is unanswered; run `ringkv status` on a member: leave again if it still lists the node), 4 if the node \
    cannot be reached."
)]
pub struct LeaveArgs {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
#[command(
    mut_arg("node", |a| a.help(CLEANUP_NODE_HELP)),
    after_help = "When a node joins, it takes over ranges of keys from the members after it on the ring, and each \
    of those ranges drops one of its former replicas. Anti-entropy fills the new node from the other replicas; the \
    former replica keeps its copies, which then take disk space and could bring a deleted value back if the ring \
    changed back after the key's tombstone was collected. Run `ringkv cleanup --node ADDR` on each old member \
    after adding nodes (one at a time, or all: each reads only its own store), like Cassandra's `nodetool cleanup`, \
    and within the nodes' --tombstone-grace-s (a day by default): a copy whose tombstone is gone can no longer be told from a lone write, and stays.\n\n\
    The node reads every key it stores, asks the key's current replicas for their versions, and removes its copy \
    if one of them holds that version or a newer one. A copy no replica holds is kept and counted: it is either a \
    write only this node received or a value deleted since whose tombstone the replicas no longer keep, and the \
    node cannot tell which. Keys it replicates are never touched. Running it again is safe: it looks at what is left. Only the node's shutdown stops \
    it once started. On a terminal a spinner counts the keys read.\n\n\
    Like a leave, it needs every member up and none leaving: it is refused while a member is leaving (run it \
    once that leave has returned), and a leave is refused while a cleanup runs.\n\n\
    Exits 0 when every replica needed could be asked, 2 if refused (a cleanup is already running there, this \
    node or another member is leaving, or one has left unknown to this node: run it again shortly), 3 if a \
    member could not be asked whether it is leaving (nothing was removed), the node is not in a cluster yet, or \
    it stopped during the cleanup, 4 if the node cannot be reached or some replicas could not be asked during \
    the cleanup (listed; the copies only they could vouch for were kept: run it again once they are up), 5 if \
    the node failed to read or write its store."
)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub target: Target,
}

// `--node` help for the commands that are not key requests: `Target`'s own
// help speaks of forwarding to the key's replicas, which they do not do.
const STATUS_NODE_HELP: &str = "The node to ask; it lists the members as it sees them (a member's news reaches the others at their next membership exchange). Several, comma-separated, are tried in turn while one cannot be reached or serves nothing now (shutting down, removed, still joining).";
const REPAIR_NODE_HELP: &str = "The node that runs the anti-entropy round, comparing its trees with every other member's. One address.";
const REMOVE_NODE_HELP: &str = "A member to carry out the removal (any but the node being removed): it drops the node and tells the other members. Several, comma-separated, are tried in turn while one cannot be reached or serves nothing now (shutting down, removed, still joining).";
const LEAVE_NODE_HELP: &str = "The node that leaves the cluster: it hands its keys over, then has another member remove it. One address.";
const CLEANUP_NODE_HELP: &str =
    "The node whose stray copies to drop (an old member, after nodes were added). One address.";

/// A parser of whole numbers from `lo` to `hi` whose errors say so in
/// words (clap's own reads "0 is not in 1..18446744073709551615").
/// `--rate`: requests a second, or `PERCENT%` of each setting's peak.
fn rate_arg(s: &str) -> Result<Rate, String> {
    match s.trim().strip_suffix('%') {
        Some(percent) => bounded::<u32>(1, Rate::PERCENT_MAX.into())(percent)
            .map(|percent| Rate::ShareOfPeak { percent })
            .map_err(|e| format!("a share of the peak (PERCENT%): {e}")),
        None => bounded::<u64>(1, RATE_MAX)(s).map(Rate::PerSecond),
    }
}

fn bounded<T>(
    lo: u64,
    hi: u64,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
{
    move |s: &str| {
        let digits = s.trim();
        let in_range = if hi == u64::MAX || hi == u64::from(u32::MAX) {
            format!("must be at least {lo} (and at most {hi})")
        } else {
            format!("must be {lo} to {hi}")
        };
        let value: u64 = match digits.parse() {
            Ok(value) => value,
            // All digits, yet no u64: too large for any range here.
            Err(_) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(in_range)
            }
            Err(_) => return Err(format!("{s:?} is not a whole number")),
        };
        if value < lo {
            return Err(if in_range.starts_with("must be at least") {
                format!("must be at least {lo}")
            } else {
                in_range
            });
        }
        if value > hi {
            return Err(in_range);
        }
        T::try_from(value).map_err(|_| in_range)
    }
}

fn parse_consistency(s: &str) -> Result<Consistency, String> {
    s.parse::<Consistency>().map_err(|e| e.message)
}

/// A share from 0 to 1.
fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number; use a share from 0 to 1, e.g. 0.1"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside 0..=1"))
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    /// Out-of-range numbers are refused in words, whatever the type.
    #[test]
    fn a_rate_is_requests_a_second_or_a_share_of_the_peak() {
        assert_eq!(rate_arg("5000"), Ok(Rate::PerSecond(5000)));
        assert_eq!(rate_arg(" 50% "), Ok(Rate::ShareOfPeak { percent: 50 }));
        assert_eq!(rate_arg("1000%"), Ok(Rate::ShareOfPeak { percent: 1000 }));
        assert_eq!(rate_arg("0"), Err("must be 1 to 10000000".to_string()));
        for (given, why) in [
            ("0%", "must be 1 to 1000"),
            ("1001%", "must be 1 to 1000"),
            ("12.5%", "\"12.5\" is not a whole number"),
            ("%", "\"\" is not a whole number"),
        ] {
            assert_eq!(
                rate_arg(given),
                Err(format!("a share of the peak (PERCENT%): {why}")),
                "{given}"
            );
        }
        assert!(rate_arg("5e3").unwrap_err().contains("not a whole number"));
    }

    #[test]
    fn bounded_numbers_say_their_range() {
        let small = bounded::<u16>(1, 1024);
        assert_eq!(small("7"), Ok(7));
        assert_eq!(small(" 1024 "), Ok(1024));
        assert_eq!(small("0"), Err("must be 1 to 1024".to_string()));
        assert_eq!(small("1025"), Err("must be 1 to 1024".to_string()));
        assert_eq!(small("-1"), Err("\"-1\" is not a whole number".to_string()));
        assert_eq!(
            small("99999999999999999999999"),
            Err("must be 1 to 1024".to_string())
        );
        let wide = bounded::<u32>(1, u32::MAX.into());
        assert_eq!(wide("0"), Err("must be at least 1".to_string()));
        assert_eq!(
            wide("5000000000"),
            Err("must be at least 1 (and at most 4294967295)".to_string())
        );
        let widest = bounded::<u64>(1, u64::MAX);
        assert_eq!(widest("18446744073709551615"), Ok(u64::MAX));
        assert!(widest("18446744073709551616")
            .unwrap_err()
            .contains("at most"));
        assert_eq!(
            widest("ten"),
            Err("\"ten\" is not a whole number".to_string())
        );
    }

    /// Key files come from the flag as given (a comma is part of a path),
    /// or else from the variable split at commas; the variable set but
    /// blank, or with an empty item, is refused naming the variable.
    #[test]
    fn key_files_come_from_the_flag_or_the_variable() {
        let paths = |list: &[&str]| list.iter().map(PathBuf::from).collect::<Vec<_>>();
        let var = |v: &str| Some(std::ffi::OsString::from(v));
        let flagged = match Cli::try_parse_from([
            "ringkv",
            "status",
            "--cluster-key-file",
            "/keys/a,b.key",
            "--cluster-key-file",
            "/keys/c",
        ])
        .unwrap()
        .command
        {
            Command::Status(a) => a.target.key.cluster_key_file,
            other => panic!("parsed as {other:?}"),
        };
        assert_eq!(flagged, paths(&["/keys/a,b.key", "/keys/c"]));
        assert_eq!(
            key_files(&flagged, var("/elsewhere")).unwrap(),
            (flagged.clone(), "--cluster-key-file")
        );
        assert_eq!(
            key_files(&[], var("/keys/new,/keys/old")).unwrap(),
            (paths(&["/keys/new", "/keys/old"]), CLUSTER_KEY_FILE_ENV)
        );
        assert_eq!(
            key_files(&[], None).unwrap(),
            (Vec::new(), CLUSTER_KEY_FILE_ENV)
        );
        let empty = key_files(&[], var("")).unwrap_err();
        assert!(
            empty.starts_with("RINGKV_CLUSTER_KEY_FILE is set but empty"),
            "{empty}"
        );
        for bad in ["/keys/a,", ",/keys/a", "/keys/a,,/keys/b"] {
            let e = key_files(&[], var(bad)).unwrap_err();
            assert!(e.contains("names an empty path"), "{bad}: {e}");
        }
    }

    /// The `--node` list `ringkv status --node LIST` would use.
    fn nodes(list: &str) -> Result<Vec<String>, String> {
        match Cli::try_parse_from(["ringkv", "status", "--node", list])
            .unwrap()
            .command
        {
            Command::Status(a) => a.target.nodes(),
            other => panic!("parsed as {other:?}"),
        }
    }

    /// The help line of `command`'s argument `arg`.
    fn help_of(command: &str, arg: &str) -> String {
        let cli = Cli::command();
        let command = cli.find_subcommand(command).unwrap();
        let arg = command.get_arguments().find(|a| a.get_id() == arg).unwrap();
        arg.get_help().unwrap().to_string()
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// A local read asks no other replica: flags about the others are
    /// refused with it rather than ignored (their defaults are not).
    #[test]
    fn a_local_read_takes_no_quorum_flags() {
        assert!(Cli::try_parse_from(["ringkv", "get", "k", "--local"]).is_ok());
        for flag in [&["-r", "all"][..], &["--strict"], &["--wait-repair"]] {
            let mut argv = vec!["ringkv", "get", "k", "--local"];
            argv.extend_from_slice(flag);
            let err = Cli::try_parse_from(argv).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{flag:?}"
            );
        }
    }

    /// A node count past any port range is refused as usage, not left to
    /// overflow the port arithmetic (a panic).
    #[test]
    fn cluster_node_counts_are_bounded() {
        for nodes in ["0", "1025", "18446744073709551615"] {
            let err = Cli::try_parse_from(["ringkv", "cluster", "--nodes", nodes]).unwrap_err();
            assert!(
                err.to_string().contains("must be 1 to 1024"),
                "{nodes}: {err}"
            );
        }
        assert!(Cli::try_parse_from(["ringkv", "cluster", "--nodes", "5"]).is_ok());
    }

    #[test]
    fn node_addresses_are_host_port_without_scheme_or_port_0() {
        assert_eq!(
            nodes("127.0.0.1:7000, localhost:7001"),
            Ok(vec![
                "127.0.0.1:7000".to_string(),
                "localhost:7001".to_string()
            ])
        );
        let err = nodes("127.0.0.1:7000,127.0.0.5:0").unwrap_err();
        assert!(err.contains("--node \"127.0.0.5:0\" has port 0"), "{err}");
        let err = nodes("http://127.0.0.1:7000").unwrap_err();
        assert!(err.contains("without") && err.contains("scheme"), "{err}");
        assert!(nodes("127.0.0.1")
            .unwrap_err()
            .contains("is not an address"));
        assert!(nodes("127.0.0.1:7000,")
            .unwrap_err()
            .contains("empty entry"));
        // A listener may take port 0 (any free port); only a peer may not.
        assert_eq!(check_host_port("--listen", "127.0.0.1:0"), Ok(()));
        let err = check_node_addr("--seed", "[::1]:0").unwrap_err();
        assert!(err.starts_with("--seed"), "{err}");
    }

    #[test]
    fn connect_timeout_is_within_the_quic_idle_timeout() {
        let parse = |ms: &str| {
            Cli::try_parse_from(["ringkv", "status", "--connect-timeout-ms", ms]).map(|_| ())
        };
        assert!(parse("0").is_err());
        assert!(parse("1").is_ok());
        let cap_ms = ringkv_node::tls::IDLE_TIMEOUT_MS;
        assert!(parse(cap_ms.to_string().as_str()).is_ok());
        assert!(parse((cap_ms + 1).to_string().as_str()).is_err());
        let help = help_of("status", "connect_timeout_ms");
        assert!(help.contains(&cap_ms.to_string()), "{help}");
    }

    #[test]
    fn help_states_the_limits_and_defaults_it_cannot_show() {
        let key_max = ringkv_core::wire::KEY_MAX_BYTES.to_string();
        for command in ["put", "get", "delete"] {
            assert!(help_of(command, "key").contains(&key_max), "{command}");
        }
        let default_replicas = format!("default {}", ringkv_node::server::DEFAULT_REPLICAS);
        assert!(help_of("node", "replicas").contains(&default_replicas));
    }

    #[test]
    fn node_help_says_what_each_command_does_with_the_node() {
        for command in ["put", "get", "delete"] {
            assert!(help_of(command, "node").contains("forwards to the key's replicas"));
        }
        for command in ["status", "repair", "remove", "leave", "cleanup"] {
            let help = help_of(command, "node");
            assert!(!help.contains("forwards"), "{command}: {help}");
        }
        assert!(help_of("repair", "node").contains("One address"));
    }
}
