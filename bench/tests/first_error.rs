//! A run whose requests fail says why: each operation's report keeps the
//! reason of its first failure (here every update is refused: its value is
//! over the node's `--max-value-bytes`).

use std::time::Duration;

use ringkv_bench::workload::{Op, Workload};
use ringkv_bench::ycsb::{run_setting, Setting, UpdateMode, YcsbConfig};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Node, NodeConfig};

#[tokio::test]
async fn a_failed_operation_reports_its_first_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
    config.replicas = Some(1);
    config.max_value_bytes = 8;
    let node = Node::start(config).await.unwrap();
    let config = YcsbConfig {
        targets: vec![node.addr()],
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
    let setting = Setting {
        r: Consistency::One,
        w: Consistency::One,
        resp: false,
    };
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
    node.shutdown().await;
}
