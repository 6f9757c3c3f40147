//! Merkle-tree anti-entropy with real processes: `ringkv repair` brings a
//! replica that missed writes up to date without any client read; a delete
//! missed by a replica never comes back, before or after its tombstone is
//! collected; siblings written on both sides of a split both survive.
//!
//! Hints are off (`--no-hints`) and periodic rounds too
//! (`--anti-entropy-interval-s 0`), so only what each test does repairs.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ringkv_core::Consistency;

const KEYS: usize = 10_000;
const WRITERS: usize = 8;

fn key(i: usize) -> String {
    format!("ae:{i}")
}

/// Writes every key at W=quorum through `addr`, `WRITERS` at a time.
async fn write_all(addr: SocketAddr) {
    write_keys(addr, KEYS, key, Consistency::Quorum, WRITERS).await
}

/// How many keys `addr` does not hold locally with value `v{i}`.
async fn missing_on(addr: SocketAddr) -> usize {
    missing_locally(addr, 0..KEYS, key).await.len()
}

/// `ringkv repair --json` on node `i`, retried (within 30 s) while the
/// node's trees are still being built after a restart.
fn repair(c: &Cluster, i: usize) -> serde_json::Value {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = c.cli(i, &["repair", "--json"]);
        if out.status.code() == Some(0) {
            let report = json(&out);
            assert_eq!(report["peers"], 2, "every other node compared: {report}");
            assert_eq!(report["peers_finished"], 2, "{report}");
            return report;
        }
        assert!(
            std::time::Instant::now() < until,
            "no complete repair round on n{} within 30 s; last: {} {}",
            i + 1,
            stdout(&out),
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn repair_brings_a_restarted_replica_every_key_without_any_read() {
    let mut c = Cluster::start(
        "repair_brings_every_key",
        3,
        3,
        &["--no-hints", "--anti-entropy-interval-s", "0"],
    );
    c.kill(2);
    let rt = runtime();
    rt.block_on(write_all(c.nodes[0].addr));
    // A put answers at W=2 while its coordinator still tries n3 until the
    // request deadline (2 s); let those attempts end before n3 returns.
    // (A late one may still land on a busy machine: the repair is checked
    // against what n3 lacks once it is back.)
    std::thread::sleep(Duration::from_millis(2500));
    c.restart(2);
    let missed = rt.block_on(missing_on(c.nodes[2].addr));
    assert!(
        missed > KEYS / 2,
        "n3 missed the writes: {missed} of {KEYS}"
    );

    let first = repair(&c, 2);
    assert_eq!(first["peers"], 2, "{first}");
    assert_eq!(first["keys_repaired"], missed, "{first}");
    assert_eq!(rt.block_on(missing_on(c.nodes[2].addr)), 0);

    let second = repair(&c, 2);
    assert_eq!(second["keys_repaired"], 0, "{second}");
    assert_eq!(second["keys_compared"], 2 * KEYS, "{second}");
    let bytes = second["bytes_sent"].as_u64().unwrap() + second["bytes_received"].as_u64().unwrap();
    assert!(
        bytes < 64 * 1024,
        "identical replicas exchange roots only: {second}"
    );

    // status reports the round and the keys it repaired.
    let status = json(&c.cli(2, &["status", "--json"]));
    let n3 = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "n3")
        .unwrap()
        .clone();
    // Both rounds' repairs: the first's, and none in the second.
    assert_eq!(n3["keys_repaired"], missed, "{status}");
    assert!(
        n3["last_exchange_unix_ms"].as_u64().unwrap() > 0,
        "{status}"
    );
}

/// A sample summed over every node's metrics endpoint.
fn total(endpoints: &[String], name: &str) -> f64 {
    endpoints
        .iter()
        .map(|e| sample(&scrape(e), name).unwrap_or(0.0))
        .sum()
}

#[test]
fn a_delete_missed_by_a_replica_never_comes_back() {
    let endpoints = Arc::new(Mutex::new(Vec::new()));
    let ports = endpoints.clone();
    let mut c = Cluster::start_each("a_delete_missed", 3, 3, move |_, ip: Ipv4Addr| {
        let metrics = format!("{ip}:{}", free_tcp_port(ip));
        ports.lock().unwrap().push(metrics.clone());
        [
            "--no-hints",
            "--anti-entropy-interval-s",
            "0",
            "--tombstone-grace-s",
            "1",
            "--metrics",
            &metrics,
        ]
        .map(String::from)
        .to_vec()
    });
    let endpoints = endpoints.lock().unwrap().clone();
    // Two keys: anti-entropy repairs one, a read the other.
    for k in ["by-repair", "by-read"] {
        assert_exit(&c.cli(0, &["put", k, "old", "-w", "all"]), 0);
    }
    c.kill(2);
    for k in ["by-repair", "by-read"] {
        assert_exit(
            &c.cli(0, &["delete", k, "-w", "quorum", "--timeout-ms", "1000"]),
            0,
        );
    }

    // Past the grace period the tombstones are kept: n3, which still holds
    // the old values, cannot be asked, and once it is seen down the nodes
    // do not try (each check would wait for a connect timeout).
    let deferred = "ringkv_tombstones_deferred_total";
    c.eventually(Duration::from_secs(10), "tombstones deferred", || {
        total(&endpoints, deferred) >= 2.0
    });
    assert_eq!(total(&endpoints, "ringkv_tombstones_collected_total"), 0.0);
    // A round that cannot reach n3 says so, in its report and its counter.
    let out = c.cli(0, &["repair", "--json"]);
    assert_exit(&out, 4);
    let report = json(&out);
    assert_eq!(report["failures"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(
        (&report["peers"], &report["peers_finished"]),
        (&serde_json::json!(2), &serde_json::json!(1)),
        "n3 is not counted as compared: {report}"
    );
    assert!(total(&endpoints, "ringkv_anti_entropy_exchange_failures_total") >= 1.0);

    c.restart(2);
    // The restarted node announced itself to the others, and counted it.
    let announced = |outcome: &str| {
        let name = format!("ringkv_membership_announces_total{{outcome=\"{outcome}\"}}");
        sample(&scrape(&endpoints[2]), &name).unwrap_or(0.0)
    };
    c.eventually(Duration::from_secs(10), "n3's announces counted", || {
        announced("same") + announced("learned") >= 2.0
    });
    for k in ["by-repair", "by-read"] {
        assert_eq!(values(&c.cli(2, &["get", k, "--local", "--json"])), ["old"]);
    }
    assert_exit(
        &c.cli(2, &["get", "by-read", "-r", "all", "--wait-repair"]),
        1,
    );
    assert_exit(&c.cli(2, &["get", "by-read", "--local"]), 1);

    let report = repair(&c, 2);
    assert_eq!(
        report["keys_repaired"], 1,
        "only by-repair was left: {report}"
    );
    assert_exit(&c.cli(2, &["get", "by-repair", "--local"]), 1);

    // Now every replica holds both tombstones: each node collects them.
    c.eventually(
        Duration::from_secs(20),
        "tombstones collected everywhere",
        || total(&endpoints, "ringkv_tombstones_collected_total") >= 6.0,
    );
    for i in 0..3 {
        let report = repair(&c, i);
        assert_eq!(report["keys_repaired"], 0, "n{}: {report}", i + 1);
        for k in ["by-repair", "by-read"] {
            assert_exit(&c.cli(i, &["get", k, "--local"]), 1);
            assert_exit(&c.cli(i, &["get", k, "-r", "all"]), 1);
        }
    }
    // And a restart (trees rebuilt from disk) brings nothing back either.
    c.kill(0);
    c.restart(0);
    let report = repair(&c, 0);
    assert_eq!(report["keys_repaired"], 0, "{report}");
    // n2's pooled connection to the old n1 fails once; a retry reconnects.
    c.eventually(
        Duration::from_secs(10),
        "a read through n2 sees no value",
        || c.cli(1, &["get", "by-repair", "-r", "all"]).status.code() == Some(1),
    );
}

#[test]
fn siblings_written_on_both_sides_of_a_split_survive_repair() {
    let mut c = Cluster::start(
        "siblings_both_sides",
        3,
        3,
        &["--no-hints", "--anti-entropy-interval-s", "0"],
    );
    // Side A: n1 alone.
    c.kill(1);
    c.kill(2);
    assert_exit(
        &c.cli(
            0,
            &["put", "cart", "left", "-w", "1", "--timeout-ms", "500"],
        ),
        0,
    );
    // Side B: n2 and n3, without n1.
    c.kill(0);
    c.restart(1);
    c.restart(2);
    assert_exit(
        &c.cli(
            1,
            &["put", "cart", "right", "-w", "2", "--timeout-ms", "1000"],
        ),
        0,
    );
    c.restart(0);
    assert_eq!(
        values(&c.cli(0, &["get", "cart", "--local", "--json"])),
        ["left"]
    );

    let report = repair(&c, 0);
    assert_eq!(
        report["keys_repaired"], 2,
        "one key, made whole with each peer: {report}"
    );
    for i in 0..3 {
        let mut got = values(&c.cli(i, &["get", "cart", "--local", "--json"]));
        got.sort();
        assert_eq!(got, ["left", "right"], "n{}", i + 1);
    }
}
