//! Client-driven reads (`--client-reads`) against three real nodes: reads
//! that the replicas asked answer alike are taken without a coordinator,
//! and a read whose replicas disagree goes to one, which repairs them.

use std::time::Duration;

use ringkv_bench::workload::{record_key, KeyDistribution, Workload};
use ringkv_bench::ycsb::{
    run_setting, ClientReadCounts, Setting, SettingReport, UpdateMode, YcsbConfig,
};
use ringkv_core::dvv::{Clock, Payload, VersionVector};
use ringkv_core::wire::{GetRequest, ReplicaRequest, Request, Response};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Client, Node, NodeConfig, NodeHandle};

const RECORDS: u64 = 8;
const PREFIX: &str = "cr:";

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// Three nodes, N=3, every quorum read asking all three (so that a read
/// coordinated after a disagreement finds and repairs every stale copy),
/// and no anti-entropy to repair anything behind the test's back; with
/// their data dirs, which must outlive them.
async fn three_nodes() -> (Vec<tempfile::TempDir>, Vec<NodeHandle>) {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let mut c = NodeConfig::on_loopback(id(&format!("n{}", i + 1)), dir.path().into());
        c.replicas = Some(3);
        c.anti_entropy_interval = None;
        c.read_repair_chance = 1.0;
        if let Some(first) = nodes.first() {
            c.seeds = vec![first.addr()];
        }
        nodes.push(Node::start(c).await.unwrap());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !nodes.iter().all(|n| n.ring().is_some_and(|r| r.len() == 3)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ring never had all three"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (dirs, nodes)
}

fn config(nodes: &[NodeHandle]) -> YcsbConfig {
    YcsbConfig {
        targets: nodes.iter().map(|n| n.addr()).collect(),
        workload: Workload::C,
        records: RECORDS,
        value_bytes: 16,
        concurrency: 3,
        connections_per_target: 1,
        duration: Duration::from_secs(1),
        warmup: Duration::ZERO,
        settings: Vec::new(),
        // Generous: a leg that times out falls back, which the first test
        // counts as a failure, and the machine may be busy.
        request_timeout_ms: 20_000,
        seed: 7,
        client_delay: Duration::ZERO,
        key_prefix: PREFIX.into(),
        rate_per_s: None,
        cluster_key: None,
        resp: false,
        updates: UpdateMode::Overwrite,
        distribution: Some(KeyDistribution::Uniform),
        probers: 0,
        client_reads: true,
    }
}

const AT_TWO: Setting = Setting {
    r: Consistency::Count(2),
    w: Consistency::Count(2),
    resp: false,
};

/// Runs `config` at R=W=2, with the counts of its client-driven reads.
async fn run_at_two(config: &YcsbConfig) -> (SettingReport, ClientReadCounts) {
    let report = run_setting(config, &AT_TWO, RECORDS, &|_| {})
        .await
        .unwrap();
    let counts = report
        .client_reads
        .expect("client-driven reads are counted");
    (report, counts)
}

/// Whether the node `client` is connected to holds a value of `key` itself.
async fn held_locally(client: &Client, key: &str) -> bool {
    let get = Request::Get(GetRequest {
        local: true,
        ..GetRequest::new(key, Consistency::One)
    });
    matches!(client.call(&get).await, Ok(Response::Get(g)) if !g.values.is_empty())
}

/// With nothing stored, every read's two replicas agree (nothing found):
/// none needs a coordinator. One client, given one node: it learns the
/// others from that node, and asks them directly too.
#[tokio::test]
async fn replicas_that_agree_answer_every_read_themselves() {
    let (_dirs, nodes) = three_nodes().await;
    let config = YcsbConfig {
        targets: vec![nodes[0].addr()],
        concurrency: 1,
        ..config(&nodes)
    };
    let (report, counts) = run_at_two(&config).await;
    assert!(counts.direct > 0, "{counts:?}");
    assert_eq!(counts.fallbacks, 0, "{counts:?}");
    assert_eq!(counts.direct, report.reads);
    assert_eq!(report.reads_not_found, report.reads);
    for n in nodes {
        n.shutdown().await;
    }
}

/// Every record is stored on n1 alone (as a W=1 write leaves it while the
/// others are cut off). A read whose first two replicas are n1 and another
/// finds them disagreeing and goes to a coordinator, which reads all three
/// and repairs the other two; later reads of that key agree. A key whose
/// first two replicas leave n1 out is read as not found by both, alike.
#[tokio::test]
async fn replicas_that_disagree_send_the_read_to_a_coordinator_which_repairs_them() {
    let (_dirs, nodes) = three_nodes().await;
    let clients: Vec<Client> = {
        let mut clients = Vec::new();
        for n in &nodes {
            clients.push(
                Client::connect(n.addr(), Duration::from_secs(5))
                    .await
                    .unwrap(),
            );
        }
        clients
    };
    let ring = nodes[0].ring().unwrap();
    let mut disagreeing = Vec::new();
    for record in 0..RECORDS {
        let key = record_key(PREFIX, record);
        let mut clock = Clock::new();
        clock.update(
            &VersionVector::new(),
            Payload::Value(b"only-on-n1".to_vec()),
            &id("writer"),
        );
        let sync = Request::replica_from(
            id("writer"),
            ReplicaRequest::Sync {
                key: key.clone().into_bytes(),
                clock,
            },
        );
        let stored = clients[0].call(&sync).await.unwrap();
        assert_eq!(stored, Response::Clock(None));
        if ring.replicas_of(key.as_bytes())[..2].contains(&id("n1")) {
            disagreeing.push(key);
        }
    }
    assert!(
        !disagreeing.is_empty(),
        "n1 is first or second for some of {RECORDS} keys"
    );
    let (report, counts) = run_at_two(&config(&nodes)).await;
    assert!(counts.fallbacks >= disagreeing.len() as u64, "{counts:?}");
    assert!(counts.direct > 0, "{counts:?}");
    assert!(report.reads_not_found < report.reads, "the value was read");
    // Read repair runs after the answer: wait for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for key in &disagreeing {
        for (i, client) in clients.iter().enumerate().skip(1) {
            while !held_locally(client, key).await {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "n{} never got {key}",
                    i + 1
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    for client in clients {
        client.close().await;
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// A member down when the setting starts cannot be dialled: the reads
/// whose first two replicas include it go to a coordinator, which reads
/// the two that are up; the others are read from the replicas directly.
/// None fails.
#[tokio::test]
async fn reads_of_keys_on_a_member_that_cannot_be_dialled_go_to_a_coordinator() {
    let (_dirs, mut nodes) = three_nodes().await;
    nodes.pop().expect("n3").shutdown().await;
    let (report, counts) = run_at_two(&config(&nodes)).await;
    assert!(counts.fallbacks > 0 && counts.direct > 0, "{counts:?}");
    let (_, reads) = report
        .ops
        .iter()
        .find(|(op, _)| *op == ringkv_bench::workload::Op::Read)
        .expect("the run read");
    assert_eq!((reads.errors, reads.timeouts), (0, 0), "{reads:?}");
    assert_eq!(reads.ops, counts.direct + counts.fallbacks);
    for n in nodes {
        n.shutdown().await;
    }
}
