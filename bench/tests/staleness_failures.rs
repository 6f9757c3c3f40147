//! The staleness prober counts the probes it could not make instead of
//! dropping them: here every write fails (W=2 on a one-node cluster), so
//! every probe is `failed`, none is a probe, and none is called fresh.

use std::time::{Duration, Instant};

use ringkv_bench::workload::Workload;
use ringkv_bench::ycsb::{probe_staleness, Setting, UpdateMode, YcsbConfig};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Node, NodeConfig};

#[tokio::test]
async fn probes_that_cannot_write_are_counted_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
    let node = Node::start(config).await.unwrap();
    let config = YcsbConfig {
        targets: vec![node.addr(), node.addr()],
        workload: Workload::A,
        records: 10,
        value_bytes: 16,
        concurrency: 1,
        connections_per_target: 1,
        duration: Duration::from_millis(500),
        settings: Vec::new(),
        request_timeout_ms: 2_000,
        seed: 1,
        client_delay: Duration::ZERO,
        key_prefix: "t:".into(),
        rate_per_s: None,
        cluster_key: None,
        resp: false,
        updates: UpdateMode::Overwrite,
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
    let visibility = probe_staleness(&config, &setting, until).await;
    let failed: u64 = visibility.iter().map(|v| v.failed).sum();
    assert!(failed > 0, "{visibility:?}");
    assert!(
        visibility.iter().all(|v| v.probes == 0 && v.fresh == 0),
        "a failed write is no probe: {visibility:?}"
    );
    node.shutdown().await;
}
