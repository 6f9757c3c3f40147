//! Runs whose requests fail report it: the staleness prober counts the
//! probes it could not make, and each operation keeps the reason of its
//! first failure. And a run's warm-up stays out of its figures.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ringkv_bench::workload::{Op, Workload};
use ringkv_bench::ycsb::{probe_staleness, run_setting, Setting, UpdateMode, YcsbConfig};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Node, NodeConfig};

/// YCSB-A for half a second, one client, 16-byte values, against `targets`.
/// R=1, W=1.
const AT_ONE: Setting = Setting {
    r: Consistency::One,
    w: Consistency::One,
    resp: false,
};

/// A one-node cluster (N=1) and its data dir.
async fn one_node() -> (tempfile::TempDir, ringkv_node::NodeHandle) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
    config.replicas = Some(1);
    let node = Node::start(config).await.unwrap();
    (dir, node)
}

fn ycsb_config(targets: Vec<SocketAddr>) -> YcsbConfig {
    YcsbConfig {
        targets,
        workload: Workload::A,
        records: 10,
        value_bytes: 16,
        concurrency: 1,
        connections_per_target: 1,
        duration: Duration::from_millis(500),
        warmup: Duration::ZERO,
        settings: Vec::new(),
        request_timeout_ms: 2_000,
        seed: 1,
        client_delay: Duration::ZERO,
        key_prefix: "t:".into(),
        rate_per_s: None,
        cluster_key: None,
        resp: false,
        updates: UpdateMode::Overwrite,
        distribution: None,
        probers: ringkv_bench::ycsb::PROBERS_DEFAULT,
        client_reads: false,
    }
}

/// Every write fails here (W=2 on a one-node cluster), so every probe is
/// `failed`, none is a probe, and none is called fresh.
#[tokio::test]
async fn probes_that_cannot_write_are_counted_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
    let node = Node::start(config).await.unwrap();
    // More probers than coordinators: they share them, and all run.
    let config = YcsbConfig {
        probers: 3,
        ..ycsb_config(vec![node.addr(), node.addr()])
    };
    // W=2 of N=3 with one node: no write can reach its quorum.
    let setting = Setting {
        r: Consistency::One,
        w: Consistency::Count(2),
        resp: false,
    };
    // Long enough for the prober's two QUIC handshakes and a failed write
    // on a busy machine (each write fails at once: W exceeds the nodes).
    let until = Instant::now() + Duration::from_secs(3);
    let probed = probe_staleness(&config, &setting, until).await.unwrap();
    assert_eq!(probed.probers, 3);
    let visibility = probed.visibility;
    let failed: u64 = visibility.iter().map(|v| v.failed).sum();
    assert!(failed > 0, "{visibility:?}");
    assert!(
        visibility.iter().all(|v| v.probes == 0 && v.fresh == 0),
        "a failed write is no probe: {visibility:?}"
    );
    node.shutdown().await;
}

/// Every update is refused here: its value is over the node's
/// `--max-value-bytes`.
#[tokio::test]
async fn a_failed_operation_reports_its_first_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
    config.replicas = Some(1);
    config.max_value_bytes = 8;
    let node = Node::start(config).await.unwrap();
    let config = ycsb_config(vec![node.addr()]);
    let setting = AT_ONE;
    let report = run_setting(&config, &setting, 10, &|_| {}).await.unwrap();
    let op = |wanted: Op| {
        report
            .ops
            .iter()
            .find(|(o, _)| *o == wanted)
            .map(|(_, r)| r)
    };
    let updates = op(Op::Update).expect("the run drew updates");
    assert!(updates.errors > 0 && updates.ops == 0, "{updates:?}");
    let reason = updates.first_error.as_deref().unwrap_or_default();
    assert!(reason.contains("--max-value-bytes"), "{reason}");
    // Reads of keys never loaded succeed (found nothing): no reason.
    let reads = op(Op::Read).expect("the run drew reads");
    assert_eq!((reads.errors, reads.first_error.as_deref()), (0, None));
    // Counted as reads that found nothing, not as siblings or values.
    assert!(report.reads > 0 && report.reads_not_found == report.reads);
    assert_eq!(report.values_read, 0);
    // One coordinator: no staleness, and the report says why.
    assert!(report.staleness.is_empty());
    let skipped = report.staleness_skipped.as_deref().unwrap_or_default();
    assert!(skipped.contains("two coordinators"), "{skipped:?}");
    // A closed loop's ops/s divides by its window, not by the time to its
    // last answer.
    assert_eq!(report.elapsed, config.duration);
    node.shutdown().await;
}

/// An open loop at 200 requests a second, with a second of warm-up and
/// one measured: the requests it counts, sent or charged as never sent,
/// are exactly the 200 due in the measured second, however fast the
/// machine answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_counts_exactly_the_requests_due_after_its_warmup() {
    let (_dir, node) = one_node().await;
    let config = YcsbConfig {
        concurrency: 4,
        rate_per_s: Some(200),
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs(1),
        ..ycsb_config(vec![node.addr()])
    };
    let setting = AT_ONE;
    let report = run_setting(&config, &setting, 10, &|_| {}).await.unwrap();
    assert_eq!(report.attempts(), 200, "{:?}", report.ops);
    node.shutdown().await;
}

/// An open loop's ops/s divides by the time to its last success, never
/// by less than its window: requests that fail (or time out) after the
/// window do not stretch it. Here every request fails (its key is over
/// the limit), so the window is the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_is_not_stretched_by_failures_after_its_window() {
    let (_dir, node) = one_node().await;
    let config = YcsbConfig {
        concurrency: 4,
        rate_per_s: Some(200),
        warmup: Duration::ZERO,
        duration: Duration::from_millis(500),
        key_prefix: "k".repeat(ringkv_core::wire::KEY_MAX_BYTES + 1),
        ..ycsb_config(vec![node.addr()])
    };
    let setting = AT_ONE;
    let report = run_setting(&config, &setting, 10, &|_| {}).await.unwrap();
    assert!(report.attempts() > 0);
    assert!(
        report.ops.iter().all(|(_, op)| op.ops == 0),
        "{:?}",
        report.ops
    );
    assert_eq!(report.elapsed, config.duration);
    node.shutdown().await;
}

/// The put-then-get benchmark reports failures as YCSB does: every put is
/// refused (over `--max-value-bytes`) and says why; the gets, of keys never
/// written, are counted as not found.
#[tokio::test]
async fn putget_reports_the_first_reason_of_its_failures() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
    config.replicas = Some(1);
    config.max_value_bytes = 8;
    let node = Node::start(config).await.unwrap();
    let config = ringkv_bench::LoadConfig {
        targets: vec![node.addr()],
        concurrency: 1,
        phase_duration: Duration::from_millis(300),
        value_bytes: 16,
        r: Consistency::One,
        w: Consistency::One,
        request_timeout_ms: 2_000,
        cluster_key: None,
    };
    let told = std::sync::Mutex::new(Vec::new());
    let report = ringkv_bench::run(&config, &|phase, share| {
        told.lock().unwrap().push((phase.to_string(), share))
    })
    .await
    .unwrap();
    // The progress bar's feed: each phase in turn, its share of the time
    // never going back and never past the whole.
    let told = told.into_inner().unwrap();
    let phases: Vec<&str> = told.iter().map(|(p, _)| p.as_str()).collect();
    let first_get = phases.iter().position(|p| *p == "get");
    assert!(
        phases.first() == Some(&"put") && first_get.is_some(),
        "{told:?}"
    );
    assert!(
        phases[first_get.unwrap()..].iter().all(|p| *p == "get"),
        "{told:?}"
    );
    assert!(
        told.iter().all(|(_, s)| (0.0..=1.0).contains(s)),
        "{told:?}"
    );
    assert!(
        told.windows(2)
            .all(|w| w[0].0 != w[1].0 || w[0].1 <= w[1].1),
        "{told:?}"
    );
    let put = &report.put.counts;
    assert!(
        put.errors > 0 && put.ops == 0 && put.timeouts == 0,
        "{put:?}"
    );
    // Refusals are not latencies.
    assert_eq!(report.put.latency_ms(0.5), None);
    let reason = put.first_error.as_deref().unwrap_or_default();
    assert!(reason.contains("--max-value-bytes"), "{reason}");
    // No put went through, so no key the gets read exists: every read
    // found nothing, and says so.
    let get = &report.get.counts;
    assert!(get.ops > 0, "{get:?}");
    assert_eq!(report.get.not_found, get.ops);
    assert_eq!((get.errors, get.first_error.as_deref()), (0, None));
    assert_eq!(report.failovers, 0);
    node.shutdown().await;
}

/// `--probers 0` asks for no staleness: the prober says so, before it
/// connects to anything.
#[tokio::test]
async fn no_probers_measure_no_staleness() {
    // Nothing listens here: a prober that tried to connect would fail
    // with another reason.
    let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let config = YcsbConfig {
        probers: 0,
        ..ycsb_config(vec![nowhere, nowhere])
    };
    let until = Instant::now() + Duration::from_secs(1);
    let why = probe_staleness(&config, &AT_ONE, until).await.unwrap_err();
    assert!(why.contains("--probers 0"), "{why}");
}
