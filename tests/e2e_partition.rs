//! A network partition between real `ringkv node` processes, made and
//! healed while they run: each node emulates its region's links
//! (`--latency-matrix`), reads the file again on SIGHUP, and a `cut = true`
//! link lets nothing through, either way.
//!
//! The Dynamo story end to end: during the partition the side with a
//! quorum still takes W=2 writes, the lone node takes W=1 writes and
//! refuses W=2, both sides write the same key, and after the heal neither
//! write is lost: a read returns both as siblings, and a write with that
//! read's context replaces them. With fallbacks on the writer's side, the
//! sloppy quorum takes the writes for owners cut off as hints, and hands
//! them over once the partition heals; when every owner of a key is cut
//! off, the coordinator itself stands in for the first of them.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use ringkv_core::wire::{PutRequest, Request, Response};
use ringkv_core::{Consistency, NodeId, Payload};
use ringkv_node::cluster_client::reached_no_peer;
use ringkv_node::ClusterClient;
use ringkv_ring::Ring;

const REGIONS: &str = "regions = [\"r1\", \"r2\", \"r3\"]\n";

/// n1 (r1) cut off from n2 (r2) and n3 (r3), or not.
fn matrix(r1_cut_off: bool) -> String {
    let mut text = REGIONS.to_string();
    for (a, b, cut) in [
        ("r1", "r2", r1_cut_off),
        ("r1", "r3", r1_cut_off),
        ("r2", "r3", false),
    ] {
        text += &format!("[[link]]\nbetween = [\"{a}\", \"{b}\"]\ncut = {cut}\n");
    }
    text
}

/// Long enough for any request here on a busy machine; a cut one fails
/// at its deadline.
const DEADLINE: Duration = Duration::from_secs(60);

/// Starts `count` nodes (N=3) in `region(i)`, all reading the matrix at
/// `path` and serving metrics, node `i` with the flags `extra(i)`; returns
/// them with their metrics addresses.
fn start(
    test: &str,
    count: usize,
    path: &Path,
    region: impl Fn(usize) -> String,
    extra: impl Fn(usize) -> Vec<&'static str>,
) -> (Cluster, Vec<String>) {
    let metrics = Mutex::new(Vec::new());
    let path = path.to_str().unwrap().to_string();
    let cluster = Cluster::start_each(test, count, 3, |i, ip| {
        let addr = format!("{ip}:{}", free_tcp_port(ip));
        metrics.lock().unwrap().push(addr.clone());
        [
            "--region",
            &region(i),
            "--latency-matrix",
            &path,
            "--metrics",
            &addr,
        ]
        .iter()
        .chain(&extra(i))
        .map(|s| s.to_string())
        .collect()
    });
    (cluster, metrics.into_inner().unwrap())
}

/// How many times the node serving `metrics` read its matrix with `result`
/// (`in_effect` or `refused`).
fn reads(metrics: &str, result: &str) -> f64 {
    let name = format!("ringkv_latency_matrix_reads_total{{result=\"{result}\"}}");
    sample(&scrape(metrics), &name).unwrap_or(0.0)
}

/// Writes `text` to the matrix file, sends every node SIGHUP, and waits
/// until each has put it in effect.
fn apply(c: &Cluster, metrics: &[String], path: &Path, text: &str) {
    let before: Vec<f64> = metrics.iter().map(|m| reads(m, "in_effect")).collect();
    std::fs::write(path, text).unwrap();
    for i in 0..c.nodes.len() {
        c.signal(i, "HUP");
    }
    for (m, before) in metrics.iter().zip(before) {
        c.eventually(DEADLINE, "every node took the new matrix in", || {
            reads(m, "in_effect") == before + 1.0
        });
    }
}

#[test]
fn a_partition_takes_writes_on_both_sides_and_heals_to_siblings() {
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("matrix.toml");
    std::fs::write(&path, matrix(false)).unwrap();
    let (cluster, metrics) = start(
        "e2e_partition",
        3,
        &path,
        |i| format!("r{}", i + 1),
        |_| vec![],
    );
    let put = |node: usize, key: &str, value: &str, w: &str, context: Option<&str>| {
        let mut args = vec!["put", key, value, "-w", w, "--timeout-ms", "1000", "--json"];
        if let Some(c) = context {
            args.extend(["--context", c]);
        }
        cluster.cli(node, &args)
    };
    let get = |node: usize, key: &str, r: &str| {
        cluster.cli(
            node,
            &["get", key, "-r", r, "--timeout-ms", "1000", "--json"],
        )
    };

    let before = put(0, "k", "before", "all", None);
    assert_exit(&before, 0);
    let seen = get(1, "k", "all");
    assert_eq!(values(&seen), ["before"]);
    let before_context = context(&seen);

    // Cut n1 off. Each node applies the cut to its own calls.
    apply(&cluster, &metrics, &path, &matrix(true));
    for (node, w) in [(0, "2"), (1, "all"), (2, "all")] {
        assert_exit(&put(node, "probe", "x", w, None), 3);
    }

    // A matrix that does not load, or lacks a member's region, is refused;
    // the node runs on with the cut still in effect.
    for bad in ["regions = [", "regions = [\"r1\"]"] {
        let refused = reads(&metrics[0], "refused");
        std::fs::write(&path, bad).unwrap();
        cluster.signal(0, "HUP");
        cluster.eventually(DEADLINE, "the bad matrix is read", || {
            reads(&metrics[0], "refused") == refused + 1.0
        });
    }
    assert_eq!(reads(&metrics[0], "in_effect"), 1.0);
    assert_exit(&cluster.cli(0, &["status"]), 0);
    assert_exit(&put(0, "probe", "x", "2", None), 3);

    // A client on n1 gets the failure of its W=2 write as it is (it may
    // have run), then moves to a node on the quorum side, and comes back
    // once the partition heals.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|i| cluster.addr(i).parse().unwrap()).collect();
    let client = runtime
        .block_on(ClusterClient::connect(
            addrs.clone(),
            0,
            Duration::from_secs(5),
            None,
        ))
        .unwrap();
    let put_w2 = |key: &str| {
        runtime.block_on(client.call(&Request::Put(PutRequest {
            timeout_ms: 1000,
            ..PutRequest::new(
                key,
                Payload::Value(b"x".to_vec()),
                Consistency::Count(2),
                None,
            )
        })))
    };
    let failed = put_w2("moved");
    assert!(reached_no_peer(&failed), "{failed:?}");
    // Each failure has the client ask n1 whether it sees most members up
    // (at most every 5 s): once n1's detector has the others down, it
    // does not, and the client moves.
    cluster.eventually(DEADLINE, "the client left the cut-off node", || {
        client.current_node() != addrs[0] || {
            let _ = put_w2("moved");
            false
        }
    });
    assert!(matches!(put_w2("moved"), Ok(Response::Put(_))));

    // Both sides write the same key, each from what it read before.
    assert_exit(&put(0, "k", "lone side", "1", Some(&before_context)), 0);
    assert_exit(&put(1, "k", "quorum side", "2", Some(&before_context)), 0);
    assert_eq!(values(&get(2, "k", "2")), ["quorum side"]);
    assert_eq!(values(&get(0, "k", "1")), ["lone side"]);
    assert_exit(&get(0, "k", "2"), 3);

    // Heal. Neither acknowledged write is lost: they come back together,
    // as each node reads through its own links.
    apply(&cluster, &metrics, &path, &matrix(false));
    let mut merged = String::new();
    for node in [1, 2, 0] {
        cluster.eventually(DEADLINE, "both sides' writes as siblings", || {
            let out = get(node, "k", "all");
            let both = out.status.success() && values(&out) == ["lone side", "quorum side"];
            if both {
                merged = context(&out);
            }
            both
        });
    }

    cluster.eventually(DEADLINE, "the client back on n1", || {
        client.current_node() == addrs[0]
    });
    assert!(matches!(put_w2("moved"), Ok(Response::Put(_))));
    runtime.block_on(client.close());

    // A write with the merged context replaces both, everywhere.
    assert_exit(&put(0, "k", "resolved", "all", Some(&merged)), 0);
    for node in 0..3 {
        assert_eq!(
            values(&get(node, "k", "all")),
            ["resolved"],
            "n{}",
            node + 1
        );
    }
}

/// Regions a (n1, n2) and b (n3, n4, n5), cut apart or not.
fn two_sides(cut: bool) -> String {
    format!("regions = [\"a\", \"b\"]\n[[link]]\nbetween = [\"a\", \"b\"]\ncut = {cut}\n")
}

fn split_key(i: usize) -> String {
    format!("split:{i}")
}

/// Writes `v{i}` to `split_key(i)` for each of `keys` through `addr` at
/// W=2, one at a time; panics on a failed write.
async fn write_w2(addr: SocketAddr, keys: &[usize]) {
    let client = ringkv_node::Client::connect(addr, Duration::from_secs(5))
        .await
        .unwrap();
    for &i in keys {
        let put = Request::Put(PutRequest {
            timeout_ms: 5000,
            ..PutRequest::new(
                split_key(i),
                Payload::Value(format!("v{i}").into_bytes()),
                Consistency::Count(2),
                None,
            )
        });
        match client.call(&put).await {
            Ok(Response::Put(_)) => {}
            other => panic!("W=2 write of {} failed: {other:?}", split_key(i)),
        }
    }
    client.close().await;
}

#[test]
fn a_sloppy_quorum_takes_writes_for_owners_cut_off_and_hands_them_over_after() {
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("matrix.toml");
    std::fs::write(&path, two_sides(false)).unwrap();
    let (c, metrics) = start(
        "e2e_partition_sloppy",
        5,
        &path,
        |i| (if i < 2 { "a" } else { "b" }).to_string(),
        |_| vec![],
    );
    // Keys n1 owns and n2 does not: their other two owners are across the
    // cut, and n2, a fallback, is the one stand-in on n1's side.
    let ring = Ring::new(
        (1..=5).map(|i| {
            (
                NodeId::new(format!("n{i}")).unwrap(),
                ringkv_ring::DEFAULT_VNODES,
            )
        }),
        3,
    )
    .unwrap();
    let (n1, n2) = (NodeId::new("n1").unwrap(), NodeId::new("n2").unwrap());
    let keys: Vec<usize> = (0..400)
        .filter(|i| {
            let pref = ring.preference_list(split_key(*i).as_bytes());
            pref.contains(&n1) && !pref.contains(&n2)
        })
        .take(30)
        .collect();
    assert_eq!(keys.len(), 30);
    // Keys all of whose owners are across the cut (n3, n4, n5).
    let far: Vec<usize> = (0..400)
        .filter(|i| {
            let pref = ring.preference_list(split_key(*i).as_bytes());
            !pref.contains(&n1) && !pref.contains(&n2)
        })
        .take(10)
        .collect();
    assert_eq!(far.len(), 10);

    apply(&c, &metrics, &path, &two_sides(true));

    let rt = runtime();
    rt.block_on(write_w2(c.nodes[0].addr, &keys));
    // Once n1 and n2 know every owner of the far keys is down, the first
    // of them after the owners in ring order takes each write as the first
    // owner's stand-in (n1 forwards it there if that is n2), and the other
    // holds it for the second.
    for (observer, far_node) in [0, 1]
        .into_iter()
        .flat_map(|o| ["n3", "n4", "n5"].map(|f| (o, f)))
    {
        c.eventually(DEADLINE, "n1 and n2 see the far side down", || {
            c.state_seen_by(observer, far_node) == "down"
        });
    }
    rt.block_on(write_w2(c.nodes[0].addr, &far));
    // And reads them back through the same stand-ins.
    for &i in &far {
        let read = c.cli(0, &["get", &split_key(i), "-r", "2", "--json"]);
        assert_eq!(values(&read), [format!("v{i}")], "{}", split_key(i));
    }
    // Each write's copy for an owner across the cut waits on n2 as a hint.
    // Polled: on a busy machine n2 may answer `status` too late once.
    c.eventually(DEADLINE, "a hint on n2 per write", || {
        let pending = hints_pending(&c, 0);
        let on_n2 = pending
            .iter()
            .find(|(id, _)| id == "n2")
            .and_then(|(_, h)| *h);
        on_n2.is_some_and(|h| h >= keys.len() as u64)
    });
    let owners_across = |i: usize| -> Vec<usize> {
        ring.preference_list(split_key(i).as_bytes())
            .replicas
            .iter()
            .filter(|n| **n != n1)
            .map(|n| n.as_str()[1..].parse::<usize>().unwrap() - 1)
            .collect()
    };
    // Not theirs yet: nothing crossed.
    for &i in &keys {
        for node in owners_across(i) {
            assert_eq!(
                rt.block_on(missing_locally(c.nodes[node].addr, [i], split_key)),
                [i]
            );
        }
    }

    apply(&c, &metrics, &path, &two_sides(false));
    c.eventually(DEADLINE, "every hint handed over", || {
        hints_pending(&c, 0).iter().all(|(_, h)| *h == Some(0))
    });
    // Each key now has a copy on an owner across the cut too; each far key
    // on two of its owners (n1's hint and n2's).
    let holding = |i: usize| {
        owners_across(i)
            .into_iter()
            .filter(|node| {
                rt.block_on(missing_locally(c.nodes[*node].addr, [i], split_key))
                    .is_empty()
            })
            .count()
    };
    for &i in &far {
        let held = holding(i);
        assert!(held >= 2, "{} reached {held} owners", split_key(i));
    }
    for &i in &keys {
        let held = holding(i);
        assert!(
            held >= 1,
            "{} reached no owner across the cut",
            split_key(i)
        );
    }
    // And anti-entropy fills the rest: after a repair, every owner holds it.
    // (The far keys' owners are n3..n5, whose rounds n1's does not cover.)
    for node in [0, 2, 3, 4] {
        assert_exit(&c.cli(node, &["repair"]), 0);
    }
    for &i in keys.iter().chain(&far) {
        for node in owners_across(i) {
            assert_eq!(
                rt.block_on(missing_locally(c.nodes[node].addr, [i], split_key)),
                Vec::<usize>::new(),
                "n{} lacks {}",
                node + 1,
                split_key(i)
            );
        }
    }
}

/// Regions r1..r4, one per node, with r4 (n4) cut off from the others or
/// not.
fn r4_cut_off(cut: bool) -> String {
    let mut text = "regions = [\"r1\", \"r2\", \"r3\", \"r4\"]\n".to_string();
    for a in 1..=4 {
        for b in a + 1..=4 {
            let cut = cut && b == 4;
            text += &format!("[[link]]\nbetween = [\"r{a}\", \"r{b}\"]\ncut = {cut}\n");
        }
    }
    text
}

/// A node removed while cut off (as the README advises for one gone past
/// the tombstone grace) keeps running, unaware, with values deleted and
/// their tombstones collected meanwhile. Once the partition heals it
/// brings none of them back: the members refuse its replica requests, so
/// a read through it (whose read repair would push its old value to them)
/// fails, and the refusal has it ask for the cluster's record, learn that
/// it was removed, and exit.
#[test]
fn a_node_removed_while_cut_off_brings_no_deleted_value_back() {
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("matrix.toml");
    std::fs::write(&path, r4_cut_off(false)).unwrap();
    let (mut c, metrics) = start(
        "e2e_partition_zombie",
        4,
        &path,
        |i| format!("r{}", i + 1),
        |i| {
            let mut flags = vec![
                "--no-hints",
                "--anti-entropy-interval-s",
                "0",
                "--tombstone-grace-s",
                "1",
            ];
            if i == 3 {
                // n4 learns of its removal from a refusal, not from an
                // exchange it happened to make first.
                flags.extend(["--membership-exchange-interval-s", "3600"]);
            }
            flags
        },
    );
    // Of twelve keys written everywhere, those n4 holds (three in four, at
    // N=3 of four nodes).
    let mut keys = Vec::new();
    for i in 0..12 {
        let key = format!("gone:{i}");
        assert_exit(&c.cli(0, &["put", &key, "old", "-w", "all"]), 0);
        if c.cli(3, &["get", &key, "--local"]).status.code() == Some(0) {
            keys.push(key);
        }
    }
    assert!(!keys.is_empty());

    apply(&c, &metrics, &path, &r4_cut_off(true));
    c.eventually(DEADLINE, "n1 sees n4 down", || {
        c.state_seen_by(0, "n4") == "down"
    });
    assert_exit(&c.cli(0, &["remove", "n4"]), 0);
    for k in &keys {
        assert_exit(&c.cli(0, &["delete", k, "-w", "all"]), 0);
    }
    let collected = || -> f64 {
        metrics[..3]
            .iter()
            .map(|m| sample(&scrape(m), "ringkv_tombstones_collected_total").unwrap_or(0.0))
            .sum()
    };
    c.eventually(DEADLINE, "the tombstones collected on n1..n3", || {
        collected() >= (3 * keys.len()) as f64
    });

    apply(&c, &metrics, &path, &r4_cut_off(false));
    // Once n4 sees the others again, reads through it, which find its old
    // values and would repair the others with them, return none of them.
    c.eventually(DEADLINE, "n4 sees n1 up", || {
        c.state_seen_by(3, "n1") == "up"
    });
    for k in &keys {
        let read = c.cli(3, &["get", k, "--timeout-ms", "1000"]);
        assert!(!stdout(&read).contains("old"), "{}", stdout(&read));
    }
    let (status, err) = c.wait_exit(3, DEADLINE);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("n4 was removed from the cluster"), "{err}");
    let refused: f64 = metrics[..3]
        .iter()
        .map(|m| sample(&scrape(m), "ringkv_requests_from_removed_total").unwrap_or(0.0))
        .sum();
    assert!(refused >= 1.0, "n4's reads were refused");
    for k in &keys {
        assert_exit(&c.cli(0, &["get", k, "-r", "all"]), 1);
        for node in 0..3 {
            assert_exit(&c.cli(node, &["get", k, "--local"]), 1);
        }
    }
}
